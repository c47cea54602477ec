"""A local model served as vLLM serves prompt log-probabilities (``/v1/completions`` with ``prompt_logprobs``): what
the served-teacher cache is tested and measured against when no vLLM is at hand. Loopback only, one model."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


def prompt_logprobs(model, ids: list[int], vocab_size: int, k: int) -> list:
    """vLLM's ``prompt_logprobs`` for ``ids``: None at position 0, then per position the top-k ids (as strings) with
    log-prob and rank, plus the prompt's own token at that position."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, :, :vocab_size]
        logp = torch.log_softmax(logits.float(), -1).cpu()
    entries = [None]
    for t in range(1, len(ids)):
        values, top = logp[t - 1].topk(k)
        entry = {str(i): {"logprob": v, "rank": r + 1}
                 for r, (v, i) in enumerate(zip(values.tolist(), top.tolist(), strict=True))}  # fmt: skip
        actual = ids[t]
        rank = int((logp[t - 1] > logp[t - 1, actual]).sum()) + 1
        entry[str(actual)] = {"logprob": logp[t - 1, actual].item(), "rank": rank}
        entries.append(entry)
    return entries


class PromptLogprobHandler(BaseHTTPRequestHandler):
    model = None
    vocab_size = 0
    lock = threading.Lock()  # one forward at a time: the model is not ours to run from several threads at once

    def log_message(self, *args):
        pass

    def answer(self, body: dict) -> bytes:
        with self.lock:
            entries = prompt_logprobs(self.model, list(body["prompt"]), self.vocab_size, int(body["prompt_logprobs"]))
        return json.dumps({"choices": [{"text": "", "prompt_logprobs": entries}]}).encode()

    def do_POST(self):  # noqa: N802
        payload = self.answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@contextmanager
def serve(model, vocab_size: int, handler: type[PromptLogprobHandler] = PromptLogprobHandler) -> Iterator[str]:
    """Serve ``model`` on 127.0.0.1 (a free port) while the block runs; yields the base URL (``.../v1``)."""
    handler = type("Served", (handler,), {"model": model.eval(), "vocab_size": vocab_size})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()
