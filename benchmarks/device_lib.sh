# Sourced by the device-call scripts (run_update_h200*.sh) from the repo root: installs the carried wheels, sets
# PYTHONPATH, O (=$OUT), M (the model folder), `part <seconds> <log> <command...>` (runs a command under
# min(seconds, what is left of BUDGET), logging its exit status to summary.txt), and records the machine, the
# package versions and the device-to-device copy ceiling.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site ${WHEELS:-.wheels}/*.whl
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
O=${OUT:-/tmp/out}; mkdir -p "$O"; M=/tmp/model15
T0=$(date +%s)
left() { echo $(( ${BUDGET:-400} - ($(date +%s) - T0) )); }
part() {  # part <seconds> <log> <command...>: run under min(seconds, what is left)
    local t=$1 log=$2; shift 2; local l; l=$(left)
    if (( l < 20 )); then echo "SKIPPED (no time): $*" | tee -a "$O/summary.txt"; return; fi
    (( t > l )) && t=$l
    timeout "$t" "$@" > "$O/$log" 2>&1; echo "rc=$? after $(( $(date +%s) - T0 )) s: $log" | tee -a "$O/summary.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$O/summary.txt"
python3 - <<'PY' | tee -a "$O/summary.txt"
import importlib.metadata as md, time, torch
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"
names = ("torch", "transformers", "triton", "peft", "bitsandbytes", "trl", "liger-kernel")
print(" ".join(f"{n} {version(n)}" for n in names), "cuda", torch.version.cuda)
x = torch.randn(2**29, device="cuda", dtype=torch.bfloat16); y = torch.empty_like(x)  # 1 GiB each
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): y.copy_(x)
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 20
print(f"copy ceiling: {2 * x.numel() * 2 / dt / 1e12:.2f} TB/s (read + write)")
PY
