"""Step metrics to TensorBoard (and W&B when installed and WANDB_API_KEY is set) and one
readable console/log line per --log-interval, from rank 0; the console and $SAVE/run_*.log
setup; $SAVE/metrics.jsonl kept to one record per iteration across resumes."""
import json
import logging
import math
import os
import sys
import time
from typing import Dict, Optional

logger = logging.getLogger("megatron_patch.train")

METRICS_FILE = "metrics.jsonl"  # one JSON record per logged iteration, in $SAVE


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class MetricsLogger:
    def __init__(self, tensorboard_dir: Optional[str], enabled: bool, run_config: Optional[dict] = None,
                 purge_step: Optional[int] = None):
        """`purge_step`: TensorBoard hides events at or after this step left by an earlier
        writer (a run that died after its last checkpoint and is now resumed)."""
        self.enabled = enabled
        self.writer = None
        self.wandb = None
        if not enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            os.makedirs(tensorboard_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=tensorboard_dir, max_queue=50, flush_secs=10,
                                        purge_step=purge_step)
        if os.environ.get("WANDB_API_KEY"):
            try:
                import wandb
                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "llava-ov-sft"),
                                        config=run_config or {}, resume="allow")
            except ImportError:
                logger.info("WANDB_API_KEY is set but wandb is not installed: TensorBoard only")

    def scalars(self, iteration: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in values.items():
                if value is not None:
                    self.writer.add_scalar(name, value, iteration)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if v is not None}, step=iteration)

    def console(self, iteration: int, total: int, values: Dict[str, float], elapsed_per_iter: float) -> str:
        eta = format_duration((total - iteration) * elapsed_per_iter)
        parts = [f"iter {iteration}/{total}", f"loss {values['train/loss']:.4f}"]
        lrs = [f"{v:.2e}" for k, v in values.items() if k.startswith("lr/")]
        parts.append("lr " + "/".join(dict.fromkeys(lrs)))
        if values.get("train/grad_norm") is not None:
            parts.append(f"grad {values['train/grad_norm']:.3f}")
        parts.append(f"{values['throughput/tokens_per_sec']:.0f} tok/s")
        parts.append(f"{elapsed_per_iter:.2f} s/it")
        if values.get("throughput/mfu") is not None:
            parts.append(f"MFU {100 * values['throughput/mfu']:.1f}%")
        if values.get("train/skipped_steps"):
            parts.append(f"skipped {int(values['train/skipped_steps'])}")
        parts.append(f"ETA {eta}")
        line = " | ".join(parts)
        if self.enabled:
            logger.info(line)
        return line

    def flush(self) -> None:
        """Everything logged so far onto disk (called with each checkpoint, so a run killed
        later still has its curves up to the step it resumes from)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


class StepTimer:
    """Wall-clock split of a step into named phases (data wait, forward-backward, optimizer)."""

    def __init__(self):
        self.phases: Dict[str, float] = {}
        self._started = None
        self._phase = None

    def start(self, phase: str) -> None:
        self.stop()
        self._phase, self._started = phase, time.perf_counter()

    def stop(self) -> None:
        if self._phase is not None:
            self.phases[self._phase] = self.phases.get(self._phase, 0.0) + time.perf_counter() - self._started
            self._phase = None

    def reset(self) -> Dict[str, float]:
        self.stop()
        phases, self.phases = self.phases, {}
        return phases


def setup_logging(save: Optional[str], rank: int) -> None:
    """INFO on rank 0 (console and $SAVE/run_<time>.log), warnings and errors on every rank."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[%(asctime)s rank {rank}] %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if save and rank == 0:
        os.makedirs(save, exist_ok=True)
        log_file = logging.FileHandler(os.path.join(save, time.strftime("run_%Y%m%d-%H%M%S.log")))
        log_file.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
        root.addHandler(log_file)


def truncate_metrics_file(path: str, iteration: int) -> None:
    """Drops records past `iteration` (written by a run that died after its last checkpoint), so
    each iteration appears once: the resumed run writes them again."""
    if not os.path.isfile(path):
        return
    with open(path) as handle:
        lines = handle.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["iteration"] <= iteration]
    if len(kept) == len(lines):
        return
    temporary = f"{path}.tmp"
    with open(temporary, "w") as handle:
        handle.writelines(kept)
    os.replace(temporary, path)
