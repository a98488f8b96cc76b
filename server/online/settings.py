"""Settings of `idp-serve serve`: the shared `Settings` plus what the server needs (model, banks, engine, HTTP).

Same sources and precedence as `Settings` (flags > `IDP_*` environment > defaults); e.g. `IDP_MODEL`,
`IDP_BANKS_DIR`, `IDP_DTYPE`, `IDP_ENGINE_OPTIONS='{"max_num_seqs": 8}'`, `IDP_API_KEY`,
`IDP_CORS_ORIGINS='["https://app.example"]'`, `IDP_MAX_PROMPTS=64`.

The request limits exist because each of them bounds work one request can make the server do before anything
else checks it (parsing the body, tokenizing every input, one selection pass per input, n decodes per input);
the defaults are generous for real clients (lm-evaluation-harness batches, chat UIs) and small next to memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr

from server.core.config import Settings
from server.core.identity import DEFAULT_MODEL
from server.online.allocator import Allocator

REPO_BANKS = Path(__file__).resolve().parents[2] / "prompt_banks"


class ServeSettings(Settings):
    """What the server serves and how; read once at start-up, then handed to `server.online.app.create_app`."""

    model: str = Field(DEFAULT_MODEL, description="Model folder, or a model name under models_dir.")
    served_model_name: str | None = Field(
        None, description="The name clients send as `model` (default: the model folder's name)."
    )
    banks_dir: Path = Field(
        REPO_BANKS,
        description="Folder of prompt banks (default: the project's prompt_banks/). When set, it must "
        "hold at least one bank: the server refuses to start (and a reload is refused) otherwise, unless "
        "allow_empty_banks_dir.",
    )
    allow_empty_banks_dir: bool = Field(
        False,
        description="Serve even when an explicitly set banks_dir holds no bank: IDP is off until banks are "
        "put there and reloaded (for serving a model without banks on purpose).",
    )
    default_bank: str | None = Field(
        None, description="Bank used when a request names none (default: the first bank by name, if any)."
    )
    allow_bank_weights_mismatch: bool = Field(
        False,
        description="Load a bank trained on other weights of the served model (same config and embeddings, "
        "another weights digest) with a warning instead of refusing to start; see server.core.banks.load_bank.",
    )
    selection_layers: list[int] | None = Field(
        None,
        description="Decoder layers whose attention scores prompts, for every bank (default: each bank's "
        "calibrated `selection_layers` from its manifest, else all layers, the paper's choice).",
    )
    selection_device: str = Field(
        "auto",
        description="torch device of the selection pass: auto (the GPU when torch sees one, else cpu), "
        "cpu, cuda, cuda:1, ...",
    )
    selection_batch_size: int | None = Field(
        None,
        ge=1,
        description="Most inputs scored in one selection pass (default: 1 when the pass runs on CPU, "
        "where batching saves little and delays the engine; 16 on a GPU).",
    )
    selection_wait_ms: float = Field(
        2.0, ge=0, description="How long a selection pass waits for more requests to join its batch."
    )
    selection_cache_size: int = Field(
        4096,
        ge=0,
        description="Selections remembered for inputs seen before (LRU entries, under 1 KB each; "
        "0: off). An input repeated exactly skips the selection pass, as vLLM's prefix cache skips its prefill.",
    )
    selection_idle_threads: int = Field(
        1,
        ge=0,
        description="torch threads of a CPU selection pass that starts while vLLM holds no request, on every "
        "core, vLLM's idle worker cores included. 1 (default): off, every pass runs on torch_threads off the "
        "worker cores, as it does whenever vLLM holds a request; off because it helps only a lone pass with "
        "speculation off (with speculation the engine holds the guessed decode during the pass) and made passes "
        "slower on a loaded host (docs/serving-cost.md). 0: torch_threads plus one per core "
        "vLLM pinned its workers to, within the cgroup's CPU quota. N: N threads.",
    )
    selection_speculation: Literal["off", "idle", "always"] = Field(
        "idle",
        description="Submit a dynamic input's decode behind a guessed prompt (its remembered selection, else "
        "the bank's last) while its selection pass runs; the pass still decides, and a wrong guess is aborted "
        "and decoded again behind the selected prompt, so answers are exactly those without it. idle "
        "(default): only while vLLM holds no request, where the pass would otherwise run alone in front of the "
        "prefill (bench/serve.py: it removes most of what IDP adds to a request at one client, "
        "docs/serving-cost.md); always: every dynamic input, a miss then also costs a busy engine a prefill; "
        "off: never.",
    )
    selection_speculation_min_hit_rate: float = Field(
        0.7,
        ge=0.0,
        le=1.0,
        description="Speculate only while at least this share of the bank's recent guesses (an exponential "
        "average over about the last ten to twenty) matched what the pass chose. A miss costs more than not "
        "speculating (vLLM finishes the step it is in, the wasted prefill, before the right decode starts), a hit "
        "saves about the pass's time; the default is about the break-even bench/speculation.py measured at one "
        "client (docs/serving-cost.md). 0: speculate whatever the guesses did.",
    )
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0: any free port).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None,
        description="vLLM compute dtype (default: the model card's serve_dtype, else float32, the safe "
        "choice on AVX2 CPUs without bf16 units; vLLM's CPU 4-bit kernels need bfloat16).",
    )
    max_model_len: int | None = Field(None, ge=1, description="Context length (default: the model's).")
    kv_cache_gib: float = Field(1.0, gt=0, description="KV-cache size in GiB given to vLLM.")
    enforce_eager: bool = Field(True, description="Skip torch.compile / CUDA graphs (faster start, slower decode).")
    engine_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra vLLM engine arguments (AsyncEngineArgs fields), passed through."
    )
    engine_allocator: Allocator = Field(
        "auto",
        description="malloc of vLLM's engine processes, preloaded (LD_PRELOAD) before they start. auto: on CPU, "
        "jemalloc if installed (Debian libjemalloc2) and no allocator is preloaded already, else glibc "
        "with a warning: under glibc vLLM's CPU worker grows over hours of traffic (docs/serving-cost.md); "
        "tcmalloc or jemalloc: that one, an error if missing; glibc: LD_PRELOAD left as it is.",
    )
    pin_frontend: bool = Field(
        True,
        description="On CPU hosts, keep the server's own threads (HTTP, tokenizing, selection) off the cores "
        "vLLM pins its workers to (see server/online/cpus.py); no effect when vLLM pins nothing (GPU).",
    )
    log_level: str = Field("info", description="uvicorn log level.")

    api_key: SecretStr | None = Field(
        None,
        description="Require `Authorization: Bearer <key>` on every path but `open_paths` (default: no key). "
        "A SecretStr, so settings' repr and logs never show it.",
    )
    open_paths: list[str] = Field(
        ["/health", "/metrics"], description="Paths served without the API key (probes and Prometheus scrapes)."
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Browser origins allowed by CORS (default: none, CORS off; '*': any)."
    )
    max_body_bytes: int = Field(8 * 2**20, ge=1, description="Largest request body accepted (413 above).")
    max_prompts: int = Field(256, ge=1, description="Most inputs in one completions request (a list prompt).")
    max_n: int = Field(16, ge=1, description="Largest `n` (choices per input) accepted.")
    max_tokens_limit: int | None = Field(
        None, ge=1, description="Largest max_tokens accepted (default: whatever the context leaves)."
    )
    engine_death_exit_s: float = Field(
        5.0,
        ge=0,
        description="After the engine or the selection worker dies, how long /health answers 503 (and "
        "in-flight requests get their error) before the server exits (status 3: engine, 4: selection worker) for "
        "its supervisor to restart it.",
    )
