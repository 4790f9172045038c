"""sageLLM and its peers (vLLM, llama.cpp, transformers) on one seeded workload.

``sagellm bench --peers vllm,llama.cpp,transformers`` measures three figures through
every installed peer in the same invocation: offline throughput (N requests x M tokens),
batch-1 decode and prefill. Every system gets the same token-id prompts, greedy
sampling and end-of-sequence ignored, and the same definitions:

- offline: generated tokens / wall time of one batch of N prompts, M tokens each;
- batch-1 decode: (L - 1) / (T(L) - T(1)), T(k) the time of one 16-token prompt with k
  generated tokens (two different prompts of the same length, so no cache can help);
- prefill: P / T(1) of one P-token prompt.

The machine is shared and noisy, so each figure runs sageLLM and the peer alternately
(A B A B, ``rounds`` times each) after one warm-up of each, and reports the median of
each side and the ratio of the medians, with the Mann-Whitney p-value of the two sample
sets. Round r uses its own prompts (seeded by r), the same for both sides, so no prefix
cache serves a repeated prompt.

vLLM runs in its own venv (it pins its own torch) through
:mod:`sagellm.engine.bench.peer_worker` in a subprocess; it reads a Hugging Face folder,
written once from the GGUF file by :mod:`sagellm.engine.bench.hf_export`. llama.cpp runs
in this process through llama-cpp-python when it imports here, else in
``.nox/peers-tools``; transformers runs in this process. A peer that is not installed is
skipped with the command that installs it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import selectors
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sagellm.engine.bench.workloads import Workload, random_prompts

__all__ = [
    "FIGURES",
    "PEER_NAMES",
    "Comparison",
    "LlamaCppPeer",
    "Peer",
    "PeerError",
    "SagellmPeer",
    "TransformersPeer",
    "WorkerPeer",
    "compare",
    "find_peer_python",
    "format_comparisons",
    "measure",
    "repo_root",
    "resolve_peers",
    "run_peers",
    "start_peer",
    "vllm_env",
]

#: Figures in the order they are measured: (key, label of the table row).
FIGURES: tuple[tuple[str, str], ...] = (
    ("offline", "offline {n} x {m} (tok/s)"),
    ("decode_b1", "batch-1 decode (tok/s)"),
    ("prefill", "prefill {p} (tok/s)"),
)
PEER_NAMES = ("vllm", "llama.cpp", "transformers")

#: The command that prepares the peers' environments.
PREPARE = "nox -s peers"
_WORKER = Path(__file__).with_name("peer_worker.py")
_DECODE_PROMPT_LEN = 16
_ROUND_SEED = 7919  # seed offset between rounds
_WARM_ROUND = -1  # the warm-up uses prompts of its own


class PeerError(RuntimeError):
    """A peer failed to start or to answer."""


class Peer(Protocol):
    """One system that generates from token ids, timed by the caller's definitions."""

    name: str
    #: Most prompts one ``generate`` call takes (None: any number).
    max_batch: int | None

    def describe(self) -> str:
        """One line: what runs (version, dtype, weights)."""
        ...

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
        """Greedy, end of sequence ignored: (wall seconds, tokens generated)."""
        ...

    def close(self) -> None:
        """Release the engine (a worker process exits)."""
        ...


# ---------------------------------------------------------------------- peers


class SagellmPeer:
    """The engine under test, in this process (an :class:`~sagellm.engine.LLM`)."""

    max_batch: int | None = None

    def __init__(self, llm: Any, name: str = "sagellm") -> None:
        self.llm = llm
        self.name = name

    def describe(self) -> str:
        runtime = self.llm.engine.runtime
        parts = [self.llm.engine.model_name]
        parts.append(str(getattr(runtime, "dtype", "")).replace("torch.", ""))
        for attr in ("quantization", "kernels"):  # what the runtime resolved, if it says
            value = getattr(runtime, attr, None)
            if isinstance(value, str) and value:
                parts.append(f"{attr} {value}")
        return f"{self.name}: " + ", ".join(parts)

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
        from sagellm.core.types import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        out = self.llm.generate(prompts, params)
        elapsed = time.perf_counter() - t0
        return elapsed, sum(len(c.token_ids) for r in out for c in r.outputs)

    def close(self) -> None:
        pass


class TransformersPeer:
    """transformers ``generate`` (padded batch; prompts here are all the same length)."""

    name = "transformers"
    max_batch: int | None = None

    def __init__(self, source: Any, dtype: str = "float32") -> None:
        import torch

        from sagellm.engine.bench.workloads import _load_hf_model

        self.dtype = dtype
        self.model = _load_hf_model(source, getattr(torch, dtype))
        self._source = source

    def describe(self) -> str:
        import transformers

        return (
            f"transformers {transformers.__version__}: {Path(self._source.path).name}, "
            f"{self.dtype} asked (GGUF weights compute in float32)"
        )

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
        import torch

        ids = torch.tensor(prompts)
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - t0, len(prompts) * max_tokens

    def close(self) -> None:
        del self.model


class LlamaCppPeer:
    """llama.cpp through llama-cpp-python in this process (GGUF models only)."""

    name = "llama.cpp"
    max_batch: int | None = 1  # llama-cpp-python runs one sequence at a time

    def __init__(self, path: Path, threads: int, n_ctx: int = 2048) -> None:
        from llama_cpp import Llama

        self.path = Path(path)
        self.llm = Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_batch=512, verbose=False
        )

    def describe(self) -> str:
        import llama_cpp

        return f"llama.cpp (llama-cpp-python {llama_cpp.__version__}): {self.path.name}"

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
        if len(prompts) != 1:
            raise PeerError("llama-cpp-python runs one sequence at a time")
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompts[0])
        for i in range(max_tokens):
            tok = llm.sample(temp=0.0)
            if i + 1 < max_tokens:
                llm.eval([tok])
        return time.perf_counter() - t0, max_tokens

    def close(self) -> None:
        self.llm.close()


class WorkerPeer:
    """A peer in another interpreter: :mod:`peer_worker` driven over JSON lines.

    ``python`` is that interpreter (vLLM's venv, a baseline revision's venv); the worker
    script is this package's, started with ``-P`` so its folder does not shadow anything.
    Its stderr goes to ``log_path``; the last lines are quoted when it fails.
    """

    def __init__(
        self,
        name: str,
        python: str | Path,
        backend: str,
        model: str,
        *,
        options: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        startup_timeout: float = 900.0,
        request_timeout: float = 1800.0,
        max_batch: int | None = None,
    ) -> None:
        self.name = name
        self.max_batch = max_batch
        self.request_timeout = request_timeout
        self._own_log = log_path is None  # a temporary log goes away after a clean exit
        if log_path is None:
            fd, raw = tempfile.mkstemp(prefix=f"sagellm-peer-{backend}-", suffix=".log")
            os.close(fd)
            log_path = Path(raw)
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")  # noqa: SIM115 (lives as long as the worker)
        cmd = [str(python), "-P", str(_WORKER), backend, "--model", model]
        cmd += ["--options", json.dumps(options or {})]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group, so pause() reaches its children
        )
        self._paused = False
        self.info: dict[str, Any] = {}
        try:
            msg = self._read(startup_timeout)
        except PeerError:
            self.close()
            raise
        if "error" in msg:
            self.close()
            raise PeerError(f"{name} failed to start: {msg['error']}\n{self.log_tail()}")
        self.info = dict(msg.get("info") or {})

    def log_tail(self, lines: int = 15) -> str:
        """The last lines the worker wrote to stderr."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        tail = "\n".join("    " + line for line in text[-lines:])
        return f"  last lines of {self.log_path}:\n{tail}"

    def _read(self, timeout: float) -> dict[str, Any]:
        from sagellm.engine.bench.peer_worker import PREFIX

        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerError(
                        f"{self.name} did not answer within {timeout:.0f} s\n{self.log_tail()}"
                    )
                if not sel.select(min(left, 5.0)):
                    if self.proc.poll() is not None:
                        break
                    continue
                line = self.proc.stdout.readline()
                if not line:
                    break
                if line.startswith(PREFIX):
                    parsed: dict[str, Any] = json.loads(line[len(PREFIX) :])
                    return parsed
        code = self.proc.wait()
        raise PeerError(f"{self.name} exited with code {code}\n{self.log_tail()}")

    def request(self, msg: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one request line; its answer (raises PeerError on an error answer)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            code = self.proc.wait()
            raise PeerError(f"{self.name} exited with code {code}\n{self.log_tail()}") from None
        answer = self._read(self.request_timeout if timeout is None else timeout)
        if "error" in answer:
            raise PeerError(f"{self.name}: {answer['error']}")
        return answer

    def _signal_group(self, sig: int) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def pause(self) -> None:
        """Stop the worker and every process it started (SIGSTOP to its group) while
        another system is measured: an idle vLLM keeps a core busy polling, which would
        count against whoever runs beside it."""
        if not self._paused:
            self._signal_group(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """Continue a paused worker (SIGCONT to its group)."""
        if self._paused:
            self._signal_group(signal.SIGCONT)
            self._paused = False

    def describe(self) -> str:
        info = ", ".join(f"{k} {v}" for k, v in self.info.items() if k != "backend")
        return f"{self.name}: {info}" if info else self.name

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
        self.resume()
        ans = self.request({"op": "generate", "prompts": prompts, "max_tokens": max_tokens})
        return float(ans["seconds"]), int(ans["num_generated"])

    def close(self) -> None:
        self.resume()
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._log.close()
        if self._own_log and self.proc.returncode == 0:
            self.log_path.unlink(missing_ok=True)


# ---------------------------------------------------------------------- measuring


def _prompts(w: Workload, vocab: int, figure: str, round_index: int) -> list[list[int]]:
    seed = w.seed + _ROUND_SEED * (round_index + 2)
    if figure == "offline":
        return random_prompts(w.num_requests, w.prompt_len, vocab, seed)
    if figure == "decode_b1":
        return random_prompts(2, _DECODE_PROMPT_LEN, vocab, seed + 1)
    return random_prompts(1, w.prefill_len, vocab, seed + 2)


def measure(peer: Peer, figure: str, w: Workload, vocab: int, round_index: int) -> float:
    """One sample of ``figure`` (tokens per second) through ``peer``."""
    prompts = _prompts(w, vocab, figure, round_index)
    warm = round_index == _WARM_ROUND
    if figure == "offline":
        seconds, n = peer.generate(prompts, min(8, w.output_len) if warm else w.output_len)
        return n / seconds
    if figure == "decode_b1":
        t1, _ = peer.generate(prompts[:1], 1)
        tl, _ = peer.generate(prompts[1:], w.decode_len)
        # noise can beat a very short decode (tiny --decode-len): no sample then
        return (w.decode_len - 1) / (tl - t1) if tl > t1 else math.nan
    if figure == "prefill":
        seconds, _ = peer.generate(prompts, 1)
        return w.prefill_len / seconds
    raise ValueError(f"unknown figure {figure!r}")


def _measure_alone(
    peer: Peer, others: Sequence[Peer], figure: str, w: Workload, vocab: int, round_index: int
) -> float:
    """:func:`measure` with every other system paused (where it can be: a worker
    process), so each sample has the machine to itself."""
    paused = [p for p in others if callable(getattr(p, "pause", None))]
    for p in paused:
        p.pause()  # type: ignore[attr-defined]
    try:
        return measure(peer, figure, w, vocab, round_index)
    finally:
        for p in paused:
            p.resume()  # type: ignore[attr-defined]


def can_measure(peer: Peer, figure: str, w: Workload) -> bool:
    """Whether ``peer`` runs ``figure`` (llama-cpp-python has no batched offline run)."""
    need = w.num_requests if figure == "offline" else 1
    return peer.max_batch is None or need <= peer.max_batch


def _median(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else float("nan")


@dataclass
class Comparison:
    """One figure of sageLLM against one peer, measured interleaved."""

    peer: str
    figure: str
    ours: list[float] = field(default_factory=list)  # samples, tokens per second
    theirs: list[float] = field(default_factory=list)

    @property
    def median_ours(self) -> float:
        return _median(self.ours)

    @property
    def median_theirs(self) -> float:
        return _median(self.theirs)

    @property
    def ratio(self) -> float:
        """sageLLM / peer, ratio of the medians (> 1: sageLLM is faster)."""
        theirs = self.median_theirs
        return self.median_ours / theirs if theirs else float("nan")

    @property
    def p_value(self) -> float:
        """Two-sided Mann-Whitney U p-value of the two sample sets."""
        from sagellm.engine.bench.perf_gate import mann_whitney_u

        ours = [v for v in self.ours if not math.isnan(v)]
        theirs = [v for v in self.theirs if not math.isnan(v)]
        if not ours or not theirs:
            return float("nan")
        return mann_whitney_u(ours, theirs)[1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "figure": self.figure,
            "sagellm_samples": self.ours,
            "peer_samples": self.theirs,
            "sagellm_median": self.median_ours,
            "peer_median": self.median_theirs,
            "ratio": self.ratio,
            "p_value": self.p_value,
        }


def compare(
    ours: Peer,
    peer: Peer,
    w: Workload,
    vocab: int,
    *,
    rounds: int = 2,
    figures: Sequence[str] = ("offline", "decode_b1", "prefill"),
    progress: Callable[[str], None] = lambda m: None,
) -> list[Comparison]:
    """Each figure of ``figures`` that ``peer`` runs: warm-up, then A B A B."""
    out = []
    for figure in figures:
        if not can_measure(peer, figure, w):
            continue
        progress(f"{ours.name} vs {peer.name}: {figure}, warm-up then {rounds} rounds interleaved")
        _measure_alone(ours, [peer], figure, w, vocab, _WARM_ROUND)
        _measure_alone(peer, [ours], figure, w, vocab, _WARM_ROUND)
        c = Comparison(peer.name, figure)
        for r in range(rounds):
            c.ours.append(_measure_alone(ours, [peer], figure, w, vocab, r))
            c.theirs.append(_measure_alone(peer, [ours], figure, w, vocab, r))
        out.append(c)
    return out


# ---------------------------------------------------------------------- finding peers


def repo_root() -> Path | None:
    """The repository this package runs from (an editable install), if any."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "noxfile.py").is_file() and (parent / "sagellm-engine").is_dir():
            return parent
    return None


def find_peer_python(venv: str, explicit: str | None = None, env_var: str | None = None) -> Path:
    """The interpreter of a peer venv: ``explicit``, ``$env_var``, else ``.nox/<venv>``
    in the current folder or the repository root. Raises FileNotFoundError saying where
    it looked."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{explicit} does not exist")
        return path
    if env_var and os.environ.get(env_var):
        path = Path(os.environ[env_var]).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{env_var}={path} does not exist")
        return path
    places = [Path.cwd()]
    root = repo_root()
    if root is not None and root not in places:
        places.append(root)
    looked = []
    for place in places:
        candidate = place / ".nox" / venv / "bin" / "python"
        looked.append(str(candidate))
        if candidate.exists():
            return candidate
    raise FileNotFoundError("no " + " or ".join(looked))


def _cpu_list(threads: int) -> str:
    """The first ``threads`` CPUs this process may use, as vLLM's bind list ("0-1")."""
    try:
        cpus = sorted(os.sched_getaffinity(0))[:threads]
    except AttributeError:  # not Linux
        cpus = list(range(threads))
    if cpus == list(range(cpus[0], cpus[0] + len(cpus))):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(str(c) for c in cpus)


def vllm_env(threads: int) -> dict[str, str]:
    """vLLM CPU on ``threads`` cores, none reserved, 2 GiB of KV, no hub (values already
    in the environment win)."""
    want = {
        "VLLM_CPU_OMP_THREADS_BIND": _cpu_list(threads),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": "2",
        # vllm-cpu 0.32.0 cannot load its own AOT compile cache on CPU ("'function' object
        # has no attribute 'finalize_loading'") and recompiles on every start (2-4 min
        # here); without AOT its inductor cache loads (warm-up ~30 s). Same compiled model.
        "VLLM_USE_AOT_COMPILE": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    return {k: os.environ.get(k, v) for k, v in want.items()}


def _can_import(python: Path, module: str) -> bool:
    done = subprocess.run(
        [
            str(python),
            "-c",
            f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)",
        ],
        capture_output=True,
    )
    return done.returncode == 0


def _runs(python: Path, code: str) -> bool:
    """``code`` runs to completion in ``python`` (not killed by an illegal instruction)."""
    return subprocess.run([str(python), "-c", code], capture_output=True).returncode == 0


def start_peer(
    name: str,
    llm: Any,
    *,
    vllm_python: str | None = None,
    threads: int | None = None,
    progress: Callable[[str], None] = lambda m: None,
) -> tuple[Peer | None, str | None]:
    """Start peer ``name`` next to the engine of ``llm``: (peer, None), or (None, why
    it was skipped, with the command that installs it)."""
    import torch

    threads = threads or torch.get_num_threads()
    source = getattr(llm.engine.runtime, "source", None)
    dtype = str(getattr(llm.engine.runtime, "dtype", "float32")).replace("torch.", "")
    if name not in PEER_NAMES:
        return None, f"unknown peer {name!r}; peers: {', '.join(PEER_NAMES)}"
    if source is None:
        return None, f"{name} skipped: the engine's model has no source on disk"
    if name == "vllm":
        try:
            python = find_peer_python("peers-vllm", vllm_python, "SAGELLM_VLLM_PYTHON")
        except FileNotFoundError as exc:
            return None, (
                f"vllm skipped: no vLLM venv ({exc}); prepare it with `{PREPARE}` "
                "or point SAGELLM_VLLM_PYTHON / --vllm-python at one"
            )
        from sagellm.engine.bench.hf_export import export_hf_folder

        folder = export_hf_folder(source, progress=progress)
        progress(f"starting vLLM ({python}); a start compiles the model (minutes)")
        worker = WorkerPeer(
            "vllm",
            python,
            "vllm",
            str(folder),
            # vLLM computes in the engine's dtype: bfloat16 where the CPU has native bf16
            # matmul, float32 where it does not (as the engine's "auto" chooses)
            options={"dtype": "bfloat16" if dtype == "bfloat16" else "float32"},
            env=vllm_env(threads),
        )
        return worker, None
    if name == "llama.cpp":
        if source.kind != "gguf":
            return None, "llama.cpp skipped: the model is not a GGUF file"
        if importlib.util.find_spec("llama_cpp") is not None:
            return LlamaCppPeer(source.path, threads), None
        try:
            tools: Path | None = find_peer_python("peers-tools")
        except FileNotFoundError:
            tools = None
        if tools is None or not _can_import(tools, "llama_cpp"):
            return None, (
                "llama.cpp skipped: llama-cpp-python is installed neither here nor in "
                f".nox/peers-tools; `{PREPARE}` installs it (or `pip install "
                "llama-cpp-python`, which compiles llama.cpp for ~13 minutes)"
            )
        if not _runs(tools, "import llama_cpp; llama_cpp.llama_backend_init()"):
            return None, (
                "llama.cpp skipped: the llama-cpp-python in .nox/peers-tools does not run on "
                "this CPU (a build for other instructions); `{PREPARE}` rebuilds it here"
            ).replace("{PREPARE}", PREPARE)
        worker = WorkerPeer(
            "llama.cpp",
            tools,
            "llama.cpp",
            str(source.path),
            options={"n_threads": threads},
            max_batch=1,
        )
        return worker, None
    if importlib.util.find_spec("transformers") is None:
        return None, "transformers skipped: `pip install transformers` (>= 5)"
    progress("transformers: loading the model")
    return TransformersPeer(source, dtype if dtype in ("float32", "bfloat16") else "float32"), None


def resolve_peers(
    names: Sequence[str],
    llm: Any,
    *,
    vllm_python: str | None = None,
    threads: int | None = None,
    progress: Callable[[str], None] = lambda m: None,
) -> tuple[list[Peer], list[str]]:
    """Start every installed peer of ``names`` at once; (peers, notes on those skipped)."""
    peers: list[Peer] = []
    notes: list[str] = []
    for name in names:
        try:
            peer, note = start_peer(
                name, llm, vllm_python=vllm_python, threads=threads, progress=progress
            )
        except Exception as exc:  # a broken peer is reported, the others still run
            peer, note = None, f"{name} failed to start: {type(exc).__name__}: {exc}"
        if peer is not None:
            peers.append(peer)
        if note:
            notes.append(note)
    return peers, notes


def run_peers(
    llm: Any,
    names: Sequence[str],
    w: Workload,
    *,
    rounds: int = 2,
    vllm_python: str | None = None,
    progress: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Every peer of ``names`` against the engine of ``llm``; a report for the table."""
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    ours = SagellmPeer(llm)
    vocab = llm.engine.vocab_size
    comparisons: list[Comparison] = []
    systems = [ours.describe()]
    notes: list[str] = []
    # One peer at a time: started just before its figures, closed right after, so no
    # idle peer holds memory or cores while another one is measured.
    for name in names:
        try:
            peer, note = start_peer(name, llm, vllm_python=vllm_python, progress=progress)
        except Exception as exc:
            peer, note = None, f"{name} failed to start: {type(exc).__name__}: {exc}"
        if note:
            notes.append(note)
        if peer is None:
            continue
        try:
            systems.append(peer.describe())
            comparisons += compare(ours, peer, w, vocab, rounds=rounds, progress=progress)
            if peer.max_batch is not None and peer.max_batch < w.num_requests:
                notes.append(
                    f"{peer.name}: no offline {w.num_requests} x {w.output_len} figure "
                    "(it runs one sequence at a time)"
                )
        except Exception as exc:
            notes.append(f"{peer.name} failed: {type(exc).__name__}: {exc}")
        finally:
            try:
                peer.close()
            except Exception as exc:
                notes.append(f"{peer.name} did not close cleanly: {exc}")
    return {
        "comparisons": [c.as_dict() for c in comparisons],
        "systems": systems,
        "rounds": rounds,
        "workload": w.__dict__,
        "notes": notes,
    }


def format_comparisons(report: dict[str, Any]) -> str:
    """Table: one row per (peer, figure): medians, the ratio, rounds, p-value."""
    w = report["workload"]
    labels = {
        key: label.format(n=w["num_requests"], m=w["output_len"], p=w["prefill_len"])
        for key, label in FIGURES
    }
    header = ["figure", "peer", "sagellm", "peer median", "sagellm/peer", "rounds", "p"]
    rows = [header]
    for c in report["comparisons"]:
        rows.append(
            [
                labels.get(c["figure"], c["figure"]),
                c["peer"],
                f"{c['sagellm_median']:.4g}",
                f"{c['peer_median']:.4g}",
                f"{c['ratio']:.2f}x",
                str(len(c["sagellm_samples"])),
                f"{c['p_value']:.3f}",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    lines.append("")
    lines.append(
        "medians of interleaved samples (A B A B; a peer process is stopped while sageLLM "
        "runs), ratio of medians; p: two-sided "
        "Mann-Whitney U (below 0.05 needs at least 4 rounds)"
    )
    lines.extend(report.get("systems", []))
    lines.extend(report.get("notes", []))
    return "\n".join(lines)
