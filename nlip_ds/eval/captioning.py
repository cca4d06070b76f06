"""Caption scoring with pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr (the COCO caption protocol).

The COCO protocol tokenizes with Stanford's PTBTokenizer and scores METEOR with its jar, both Java tools.
Where Java does not run, tokenization falls back to a lowercase word split that drops punctuation as the PTB
step does (logged as a warning; BLEU/CIDEr then differ slightly from the official numbers), and METEOR is
reported missing with the reason. Neither failure stops the evaluation.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import threading

logger = logging.getLogger(__name__)

METEOR_TIMEOUT_S = 600.0
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def simple_tokenize(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    """Lowercase words, punctuation dropped: the fallback for the PTB tokenizer."""
    return {k: [" ".join(_WORD.findall(c.lower())) for c in caps] for k, caps in captions.items()}


def ptb_tokenize(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    """pycocoevalcap's PTBTokenizer; raises RuntimeError when Java gave no (or too little) output, which the
    wrapper itself does not notice."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in captions.items()})
    if any(len(out.get(k, [])) != len(caps) for k, caps in captions.items()):
        raise RuntimeError("PTBTokenizer returned fewer lines than it was given")
    return out


def tokenize(captions: dict[int, list[str]]) -> tuple[dict[int, list[str]], str]:
    """(tokenized captions, "ptb" or "simple")."""
    try:
        return ptb_tokenize(captions), "ptb"
    except Exception as exc:  # any failure of the Java tool (missing java, crash, unwritable folder)
        logger.warning("PTB tokenizer (Java) failed (%s: %s); using the simple word tokenizer, so scores may "
                       "differ slightly from the official ones", type(exc).__name__, exc)
        return simple_tokenize(captions), "simple"


def meteor_score(gts: dict, res: dict, timeout_s: float = METEOR_TIMEOUT_S) -> float:
    """METEOR through its jar, in a thread so that a wedged Java process is killed instead of hanging us."""
    from pycocoevalcap.meteor.meteor import Meteor

    if shutil.which("java") is None:  # checked first: Meteor() half-built by a failed start breaks in __del__
        raise FileNotFoundError("no `java` on PATH")
    scorer = Meteor()
    result: dict = {}

    def work():
        try:
            result["score"] = scorer.compute_score(gts, res)[0]
        except Exception as exc:  # the jar died: its wrapper reads an empty line and fails to parse it
            result["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout_s)
    scorer.meteor_p.kill()
    if scorer.lock.locked():
        scorer.lock.release()  # its __del__ takes the lock; a failed compute_score left it held
    if thread.is_alive():
        raise TimeoutError(f"METEOR gave no answer within {timeout_s:.0f} s")
    if "error" in result:
        raise result["error"]
    return float(result["score"])


def score_captions(references: list[list[str]], hypotheses: list[str]) -> tuple[dict, dict]:
    """(metrics, notes) for hypotheses[i] against references[i]. metrics: bleu1..bleu4, meteor (when Java
    runs), rouge_l, cider; notes: the tokenizer used and {"missing": {metric: reason}}."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(references) != len(hypotheses) or not hypotheses:
        raise ValueError(f"{len(hypotheses)} captions for {len(references)} reference sets")
    # One tokenizer call for both sides, so that both are tokenized the same way: image i's references
    # under key 2i, its hypothesis under 2i + 1.
    both = {k: caps for i, (refs, hyp) in enumerate(zip(references, hypotheses))
            for k, caps in ((2 * i, refs), (2 * i + 1, [hyp]))}
    tokens, kind = tokenize(both)
    gts = {i: tokens[2 * i] for i in range(len(hypotheses))}
    res = {i: tokens[2 * i + 1] for i in range(len(hypotheses))}
    with contextlib.redirect_stdout(io.StringIO()) as chatter:  # Bleu prints its counts to stdout
        bleu = Bleu(4).compute_score(gts, res)[0]
    logger.debug("BLEU scorer: %s", chatter.getvalue().strip())
    metrics = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    notes: dict = {"tokenizer": kind, "missing": {}}
    try:
        metrics["meteor"] = meteor_score(gts, res)
    except Exception as exc:  # Java missing or failing: report, never crash
        notes["missing"]["meteor"] = f"{type(exc).__name__}: {exc}"
        logger.warning("METEOR not computed: %s", notes["missing"]["meteor"])
    metrics["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    metrics["cider"] = float(Cider().compute_score(gts, res)[0])
    return metrics, notes
