"""lm-eval model `dsel`: likelihoods and greedy generation against brute force with the model's logits."""
import json
import math

import pytest
import torch

from _eval_util import tiny_checkpoint, tokenized_slice
from dsel.eval.lm_eval import TASKS_DIR, with_bundled_tasks


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from dsel.eval.lm_model import DselLM

    tmp = tmp_path_factory.mktemp("lm")
    meta = tokenized_slice(tmp)
    return DselLM(str(tiny_checkpoint(tmp / "model", meta)), batch_size=3)


@pytest.fixture(scope="module")
def checkpoint(lm, tmp_path_factory):
    return str(next(tmp_path_factory.getbasetemp().glob("lm*/model")))


class Request:
    def __init__(self, *args):
        self.args = args


def next_logprobs(lm, prefix: list[int]) -> torch.Tensor:
    """log p(. | prefix) from one forward of the model on exactly `prefix`, in float64."""
    with torch.no_grad():
        return torch.log_softmax(lm.model(torch.tensor([prefix]))[0, -1].double(), -1)


def brute_logprob(lm, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One forward per continuation token; the sequence is first cut to the last max_length + 1 tokens."""
    full = (context + continuation)[-(lm.max_length + 1):]
    start = len(full) - len(continuation)
    total, greedy = 0.0, True
    for k, token in enumerate(continuation):
        logprobs = next_logprobs(lm, full[:start + k])
        total += float(logprobs[token])
        greedy &= int(logprobs.argmax()) == token
    return total, greedy


def test_loglikelihood_matches_brute_force(lm):
    pairs = [("Ethanol boils at", " 78 degrees Celsius."), ("The koala lives in", " eucalyptus forests"),
             ("", "Mars orbits the Sun."), ("Whisk 200 grams of butter " * 6, "with sugar."),
             ("Section 4.2.", " \"Fees\" has the meaning given in the Schedule.")]
    got = lm.loglikelihood([Request(c, x) for c, x in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        if context:
            ctx, cont = lm._encode_pair(context, continuation)
        else:
            ctx, cont = [lm.eot_token_id], lm.tok_encode(continuation)
        want, want_greedy = brute_logprob(lm, ctx, cont)
        assert logprob == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy


def test_greedy_flag_is_true_for_the_models_own_argmax(lm):
    context = lm.tok_encode("The atomic number of gold is")
    continuation = []
    for _ in range(3):
        with torch.no_grad():
            continuation.append(int(lm.model(torch.tensor([context + continuation]))[0, -1].argmax()))
    (logprob, greedy), = lm._loglikelihood_tokens([(None, context, continuation)])
    assert greedy and logprob < 0


def test_loglikelihood_rolling_sums_every_token_once(lm):
    text = " ".join(["Jupiter orbits the Sun once every 4333 days."] * 8)  # longer than the context of 32
    tokens = lm.tok_encode(text)
    assert len(tokens) > 2 * lm.max_length
    stream, L = [lm.eot_token_id] + tokens, lm.max_length
    # token k sits at stream[k + 1]; disjoint chunks of L predictions see context from their chunk's
    # start, except the last, partial chunk, which sees the L tokens before its end
    starts = [max(0, min((k // L) * L, len(tokens) - L)) for k in range(len(tokens))]
    want = sum(float(next_logprobs(lm, stream[s:k + 1])[tokens[k]]) for k, s in enumerate(starts))
    got, = lm.loglikelihood_rolling([Request(text)])
    assert got == pytest.approx(want, rel=1e-5)


def test_generate_until_is_greedy_and_stops(lm):
    context = "Acetone boils at"
    tokens = lm.tok_encode(context)
    generated = []
    for _ in range(6):
        with torch.no_grad():
            generated.append(int(lm.model(torch.tensor([(tokens + generated)[-lm.max_length:]]))[0, -1].argmax()))
        if generated[-1] == lm.eot_token_id:
            generated.pop()
            break
    want = lm.tok_decode(generated)
    got, = lm.generate_until([Request(context, {"max_gen_toks": 6, "until": []})])
    assert got == want
    if len(want.strip()) > 1:
        stop = want.strip()[1]
        cut, = lm.generate_until([Request(context, {"max_gen_toks": 6, "until": [stop]})])
        assert cut == want.split(stop)[0]


def test_simple_evaluate_on_the_bundled_task_matches_manual_accuracy(lm):
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=["dsel_science_facts"], limit=10, task_manager=manager,
                                      log_samples=False)
    acc = results["results"]["dsel_science_facts"]["acc,none"]
    facts = [json.loads(line) for line in (TASKS_DIR / "dsel_science" / "facts.jsonl").read_text().splitlines()][:10]
    correct = 0
    for item in facts:
        scores = [brute_logprob(lm, *lm._encode_pair(item["context"], " " + c))[0] for c in item["choices"]]
        correct += max(range(4), key=scores.__getitem__) == item["label"]
    assert acc == pytest.approx(correct / 10)
    assert not math.isnan(results["results"]["dsel_science_facts"]["acc_norm,none"])


def test_wrapper_adds_the_bundled_tasks_once():
    assert with_bundled_tasks(["--model", "dsel"])[-2:] == ["--include_path", str(TASKS_DIR)]
    assert with_bundled_tasks(["--include_path", "x"]) == ["--include_path", "x"]


def test_dsel_eval_lm_eval_command_writes_the_task_metrics(checkpoint, tmp_path):
    from dsel.cli import main

    out = tmp_path / "lm_eval.json"
    main(["eval", "lm-eval", f"checkpoint={checkpoint}", "builtin_tasks=false", "limit=4", f"out={out}"])
    result = json.loads(out.read_text())
    assert 0.0 <= result["results"]["dsel_science_facts"]["acc,none"] <= 1.0
    assert result["n_samples"]["dsel_science_facts"]["effective"] == 4


def test_lm_eval_cli_default_cuda_falls_back_to_cpu_without_a_gpu():
    from dsel.eval.lm_model import pick_device

    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("cuda").type == want and pick_device("auto").type == want and str(pick_device("cpu")) == "cpu"
