"""The same numbers through a live server: re-score in-process multiple-choice records through `/v1/completions`
(echo + logprobs of token ids, the method's prompt forced or selected by the server), which must agree."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from server.core.banks import PromptBank
from server.lab.evaluate.examples import GEN_TASKS, EvalExample
from server.lab.tasks import Example

if TYPE_CHECKING:
    import httpx


def idp_request(method: str, bank: PromptBank, single: PromptBank | None) -> dict | None:
    """The `idp` field that makes a server run `method` (None: the method is not a served one, e.g. base, LoRA)."""
    if method == "compressed":
        return {"mode": "none"}
    if method == "idp":
        return {"bank": bank.name, "mode": "dynamic"}
    if method.startswith("forced:"):
        return {"bank": bank.name, "prompt": method.removeprefix("forced:")}
    if method == "single" and single is not None:
        return {"bank": single.name, "prompt": single.prompt_names[0]}
    return None


def _echo(client: httpx.Client, model: str, ids: list[int], idp: dict) -> tuple[list[float | None], dict]:
    """Per-token logprobs of token ids scored by the server (echo, nothing generated) and its `idp` info."""
    body = {"model": model, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0, "idp": idp}
    choice = client.post("/v1/completions", json=body).raise_for_status().json()["choices"][0]
    return choice["logprobs"]["token_logprobs"], choice["idp"]


def server_mc_record(client: httpx.Client, model: str, tokenizer, example: Example, idp: dict) -> dict:
    """`records.mc_record` through `/v1/completions`: a dynamic request first selects on the context alone (an
    echo of the context), then every choice is scored with that prompt forced, as the in-process path does."""
    context = tokenizer(example.context)["input_ids"]
    if idp.get("mode") == "dynamic":
        _, info = _echo(client, model, context, idp)
        idp = {"bank": info["bank"], "prompt": info["prompt"]}
    scores = []
    for choice in example.choices:
        logprobs, info = _echo(client, model, context + tokenizer(choice, add_special_tokens=False)["input_ids"], idp)
        scores.append(float(sum(logprobs[len(context) :])))
    pred = max(range(len(scores)), key=scores.__getitem__)
    return {"prompt": info["prompt"], "scores": scores, "pred": pred, "correct": int(pred == example.answer)}


def check_server(
    url: str,
    model: str,
    tokenizer,
    records: list[dict],
    examples: list[EvalExample],
    bank: PromptBank,
    single: PromptBank | None,
) -> dict:
    """Re-score in-process MC records through a live server; the largest score difference and agreements."""
    import httpx  # an HTTP client (the test extra): only this optional check needs one

    by_key = {(t, i): e for t, i, e in examples}
    worst, same_pred, same_prompt, count = 0.0, 0, 0, 0
    with httpx.Client(base_url=url, timeout=300) as client:
        for record in tqdm(records, desc="server check"):
            idp = idp_request(record["method"], bank, single)
            if idp is None or record["task"] in GEN_TASKS:
                continue
            served = server_mc_record(client, model, tokenizer, by_key[record["task"], record["example"]], idp)
            worst = max(worst, *(abs(a - b) for a, b in zip(served["scores"], record["scores"], strict=True)))
            same_pred += served["pred"] == record["pred"]
            same_prompt += served["prompt"] == record["prompt"]
            count += 1
    return {
        "url": url,
        "records": count,
        "max_abs_score_diff": worst,
        "same_prediction": same_pred,
        "same_prompt": same_prompt,
    }
