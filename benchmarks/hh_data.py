"""HH-RLHF-shaped preference pairs, made offline and deterministically (no downloads): the benchmarks' data.

Anthropic's HH-RLHF rows are multi-turn conversations (1-3 exchanges, then a question) of a few hundred
tokens, with a chosen and a rejected final reply of 40-150 tokens. ``make_pairs`` builds rows of that
shape from sentences of common English words, each text cut to a token length drawn per row, so a
benchmark measures real sequence lengths (the cost of a forward is in its tokens, not its words). The
same ``seed`` gives the same rows on every machine with the same tokenizer.

    from hh_data import make_pairs, preference_examples
    rows = make_pairs(tok, 200, seed=0)           # dicts: prompt (messages), chosen, rejected
    pairs = preference_examples(rows)             # paft.data.formats.PreferenceExample
"""

from __future__ import annotations

import random
import statistics
from typing import Any

WORDS = ("the a to of and in is it you that he was for on are with as his they be at one have this from or had "
         "by word but what some we can out other were all there when up use your how said an each she which do "
         "their time if will way about many then them write would like so these her long make thing see him two "
         "has look more day could go come did number sound no most people my over know water than call first who "
         "may down side been now find any new work part take get place made live where after back little only "
         "round man year came show every good me give our under name very through just form sentence great think "
         "say help low line differ turn cause much mean before move right boy old too same tell does set three "
         "want air well also play small end put home read hand port large spell add even land here must big high "
         "such follow act why ask men change went light kind off need house picture try us again animal point "
         "mother world near build self earth father head stand own page should country found answer school grow "
         "study still learn plant cover food sun four between state keep eye never last let thought city tree "
         "cross farm hard start might story saw far sea draw left late run while press close night real life few "
         "north open seem together next white children begin got walk example ease paper group always music those "
         "both mark often letter until mile river car feet care second book carry took science eat room friend "
         "began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl "
         "usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song "
         "measure door product black short numeral class wind question happen complete ship area half rock order "
         "fire south problem piece told knew pass since top whole king space heard best hour better true during "
         "hundred five remember step early hold west ground interest reach fast verb sing listen six table travel "
         "less morning ten simple several vowel toward war lay against pattern slow center love person money serve "
         "appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry "
         "dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood "
         "contain front teach week final gave green oh quick develop ocean warm free minute strong special mind "
         "behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object "
         "decide surface deep moon island foot system busy test record boat common gold possible plane stead dry "
         "wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant "
         "fill east paint language among").split()


def _text(rng: random.Random, tok, lo: int, hi: int) -> str:
    """Sentences of common words until the text is ``lo``..``hi`` tokens long (target drawn uniformly)."""
    target = rng.randint(lo, hi)
    words: list[str] = []
    while True:
        n = rng.randint(6, 16)
        sentence = " ".join(rng.choice(WORDS) for _ in range(n))
        words.append(sentence[0].upper() + sentence[1:] + rng.choice(".?!"))
        text = " ".join(words)
        if len(tok(text, add_special_tokens=False)["input_ids"]) >= target:
            ids = tok(text, add_special_tokens=False)["input_ids"][:target]
            return tok.decode(ids).strip()


def make_pairs(tok, n: int, seed: int, prompt_tokens: tuple[int, int] = (100, 300),
               reply_tokens: tuple[int, int] = (40, 150)) -> list[dict[str, Any]]:
    """``n`` rows of (prompt messages, chosen, rejected) in HH-RLHF's shape: 1-3 exchanges, then a question;
    the prompt's content ``prompt_tokens`` long in all (before the chat template), each reply ``reply_tokens``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        turns = rng.randint(1, 3) * 2 - 1  # user, (assistant, user)*
        budget = rng.randint(*prompt_tokens)
        per = max(20, budget // turns)
        prompt = [{"role": "user" if i % 2 == 0 else "assistant", "content": _text(rng, tok, per - 10, per)}
                  for i in range(turns)]
        rows.append({"prompt": prompt, "chosen": _text(rng, tok, *reply_tokens),
                     "rejected": _text(rng, tok, *reply_tokens)})
    return rows


def token_lengths(tok, rows: list[dict[str, Any]]) -> dict[str, float]:
    p = [len(tok(tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]) for r in rows]
    c = [len(tok(r["chosen"], add_special_tokens=False)["input_ids"]) for r in rows]
    return {"prompt_median": statistics.median(p), "prompt_min": min(p), "prompt_max": max(p),
            "reply_median": statistics.median(c), "reply_min": min(c), "reply_max": max(c)}


def preference_examples(rows: list[dict[str, Any]]) -> list:
    """``make_pairs``' rows as paft's preference examples."""
    from paft.data.formats import PreferenceExample

    return [PreferenceExample(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"]) for r in rows]
