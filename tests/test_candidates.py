"""Training-free candidates (paft.methods.candidates): each live-merged candidate equals its closed form,
computed by hand from the loaded SFT and sequential models, for LoRA and full fine-tuned branches."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from paft.config import load_config
from paft.errors import ConfigError, PaftError
from paft.merge.live import LiveMerge
from paft.methods.candidates import CANDIDATES, add_weights, branch_weights
from paft.pipeline import Run

LAYERS = 4
SETS = ["candidates.expo_alpha=[0.5, 2.0]", "candidates.average_alpha=[0.25]",
        "candidates.average_blocks=[[0.0, 1.0], [0.2, 0.9, 0.4]]", "candidates.merge_methods=[]"]
# per-block alpha at layer i of 4 (t = i/3), interpolated by hand over the anchors
BLOCK_ALPHAS = {"average_blocks_0-1": [0.0, 1 / 3, 2 / 3, 1.0],
                "average_blocks_0.2-0.9-0.4": [0.2, 0.2 + (2 / 3) * 0.7, 0.9 - (1 / 3) * 0.5, 0.4]}


def _add_lora(model, out, seed):
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    peft.save_pretrained(out)


def _perturbed(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _run(root, base):
    cfg = load_config(preset="tiny", overrides=[f"model.name={base}", f"run.output_dir={root}", *SETS])
    return Run(cfg)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from paft.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("cand") / "base", seed=0, hidden=32, layers=LAYERS, vocab=300)


@pytest.fixture(scope="module", params=["lora", "full"])
def branches(request, base, tmp_path_factory):
    """A run folder with an SFT and a sequential branch output, and theta_sft, theta_seq as loaded tensors."""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "lora":  # the sequential adapter trains on the SFT-merged model, as the pipeline does
        _add_lora(AutoModelForCausalLM.from_pretrained(base), root / "sft" / "adapter", 1)

        def sft_model():
            return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                             str(root / "sft" / "adapter")).merge_and_unload()

        _add_lora(sft_model(), root / "sequential" / "adapter", 2)
        sft = sft_model()
        seq = PeftModel.from_pretrained(sft_model(), str(root / "sequential" / "adapter")).merge_and_unload()
    else:  # adapter: full: each branch wrote its model folder; the sequential one is theta_seq itself
        sft = _perturbed(AutoModelForCausalLM.from_pretrained(base), 1)
        sft.save_pretrained(root / "sft" / "model")
        seq = _perturbed(AutoModelForCausalLM.from_pretrained(root / "sft" / "model"), 2)
        seq.save_pretrained(root / "sequential" / "model")
    return request.param, _run(root, base), sft.state_dict(), seq.state_dict()


def _live(base, spec):
    return LiveMerge(AutoModelForCausalLM.from_pretrained(base), base).apply(spec.plan).state_dict()


def test_expo_and_averaging_equal_their_closed_forms(base, branches):
    kind, run, sft, seq = branches
    found, skipped = run.candidate_specs()
    assert skipped == {}
    names = [r["name"] for r, _ in found]
    assert names == ["expo_0.5", "expo_2", "average_0.25", "average_blocks_0-1", "average_blocks_0.2-0.9-0.4"]
    closed = {"expo_0.5": lambda a, b: b + 0.5 * (b - a), "expo_2": lambda a, b: b + 2.0 * (b - a),
              "average_0.25": lambda a, b: 0.75 * a + 0.25 * b}
    for record, spec in found:
        if record["name"] not in closed:
            continue
        got = _live(base, spec)
        for name, want in ((n, closed[record["name"]](sft[n], seq[n])) for n in sft):
            torch.testing.assert_close(got[name], want, rtol=0, atol=2e-6, msg=f"{kind} {record['name']} {name}")


def test_per_block_average_interpolates_alpha_over_the_layers(base, branches):
    kind, run, sft, seq = branches
    specs = {r["name"]: s for r, s in run.candidate_specs()[0]}
    changed = 0
    for cname, alphas in BLOCK_ALPHAS.items():
        got = _live(base, specs[cname])
        for name in sft:
            if ".layers." in name:
                a = alphas[int(name.split(".layers.")[1].split(".")[0])]
            else:  # mergekit's positions outside the layer stack: embeddings at the bottom, the rest at the top
                a = alphas[0] if "embed" in name or name == "lm_head.weight" else alphas[-1]  # tiny ties the two
            want = (1 - a) * sft[name] + a * seq[name]
            torch.testing.assert_close(got[name], want, rtol=0, atol=2e-6, msg=f"{kind} {cname} {name}")
            changed += not torch.equal(sft[name], seq[name])
    assert changed > 0  # the two models differ where the test looks


def test_weights_convert_once_for_every_family():
    # (w_sft, w_seq) over (theta_sft - base, theta_seq - base) -> (w_sft + w_seq, w_seq) over (d_sft, d_seqA)
    assert branch_weights(CANDIDATES["expo"].recipe(0.5).weights, sequential_full=False) == (1.0, 1.5)
    assert branch_weights(CANDIDATES["average"].recipe(0.25).weights, sequential_full=False) == (1.0, 0.25)
    assert branch_weights(CANDIDATES["average"].recipe(0.25).weights, sequential_full=True) == (0.75, 0.25)
    assert branch_weights(CANDIDATES["average_blocks"].recipe([0.2, 0.6]).weights, False) == ([1.0, 1.0], [0.2, 0.6])
    assert add_weights(0.5, [0.1, 0.2]) == [0.6, 0.7]
    with pytest.raises(PaftError, match="2 and 3 anchors"):
        add_weights([0.0, 1.0], [0.0, 0.5, 1.0])


def test_families_without_their_branches_are_skipped_with_why(base, tmp_path):
    _add_lora(AutoModelForCausalLM.from_pretrained(base), tmp_path / "sft" / "adapter", 1)
    _add_lora(AutoModelForCausalLM.from_pretrained(base), tmp_path / "preference" / "adapter", 3)
    cfg = load_config(preset="tiny", overrides=[f"model.name={base}", f"run.output_dir={tmp_path}",
                                                "run.sequential_baseline=false", "candidates.merge_methods=[ties, della]"])
    found, skipped = Run(cfg).candidate_specs()
    assert [r["name"] for r, _ in found] == ["paft_della"]  # ties is merge.method: the run's own paft model
    assert set(skipped) == {"expo", "average", "average_blocks"}
    assert "sequential branch, not trained; run.sequential_baseline is false" in skipped["expo"]


@pytest.mark.parametrize("override,match", [
    ("candidates.merge_methods=[ties, tie]", r"config key 'candidates.merge_methods': unknown merge method 'tie'; "
                                             r"known: breadcrumbs, .*dare_ties.*"),
    ("candidates.expo_alpha=[-0.5]", r"candidates.expo_alpha': alpha -0.5 < 0 .* candidates.average_alpha"),
    ("candidates.expo_alpha=[50]", r"candidates.expo_alpha': alpha 50.0 extrapolates more than 10x"),
    ("candidates.average_alpha=[1.5]", r"candidates.average_alpha': alpha 1.5 is outside \[0, 1\].*expo_alpha"),
    ("candidates.average_blocks=[[0.5]]", r"candidates.average_blocks': \[0.5\]: give at least 2 anchors"),
    ("candidates.average_blocks=[[0.0, 2.0]]", r"candidates.average_blocks': .* in \[0, 1\]"),
    ("candidates.average_alpha=[0.5, 0.5]", r"0.5 is listed twice"),
])
def test_bad_settings_fail_in_one_line_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config(preset="tiny", overrides=[override])
    assert "\n" not in str(err.value)


def test_set_takes_lists_and_single_values():
    c = load_config(preset="tiny", overrides=["candidates.expo_alpha=[0.3,1.0]", "candidates.average_alpha=0.2",
                                               "candidates.average_blocks=[0, 0.5, 1]",
                                               "candidates.merge_methods=della"]).candidates
    assert (c.expo_alpha, c.average_alpha, c.average_blocks, c.merge_methods) == \
        ([0.3, 1.0], [0.2], [[0.0, 0.5, 1.0]], ["della"])
    assert load_config(preset="tiny", overrides=["candidates.expo_alpha=[0]"]).candidates.expo_alpha == [0.0]


def test_a_candidate_merge_the_run_params_break_fails_before_any_evaluation(base, tmp_path):
    _add_lora(AutoModelForCausalLM.from_pretrained(base), tmp_path / "sft" / "adapter", 1)
    _add_lora(AutoModelForCausalLM.from_pretrained(base), tmp_path / "preference" / "adapter", 3)
    cfg = load_config(preset="tiny", overrides=[f"model.name={base}", f"run.output_dir={tmp_path}",
                                                "candidates.merge_methods=[breadcrumbs]", "merge.density=0.9",
                                                "merge.params={gamma: 0.2}"])
    with pytest.raises(ConfigError, match=r"candidates.merge_methods: paft_breadcrumbs: .*gamma \+ density must be <= 1"):
        Run(cfg).candidate_specs()
