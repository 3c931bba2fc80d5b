"""The SFT training loop: setup, train, evaluate, checkpoint, log.

Reads top-down: `main` validates arguments (cheap, before any process group or model), sets up
parallelism, builds tokenizer -> model -> optimizer -> checkpoint -> data, then `Trainer.train`
runs iterations until --train-iters, a signal, --exit-interval or --exit-duration-in-mins.
"""
import itertools
import json
import logging
import os
import time
from typing import Optional, Sequence

import torch

from megatron_patch.compat import checkpoint_writer
from megatron_patch.data.blends import dataset_folders, train_data_fingerprint
from megatron_patch.data.sft_loader import (DatasetChangedError, LoaderStateMismatch,
                                            build_train_loader, build_val_loader, check_manifest,
                                            close_loader, restore_loader_state, save_loader_state)
from megatron_patch.data.sft_task_encoder import SFTTaskEncoder, find_data_stop, with_full_rows
from megatron_patch.data.tokenizer import SFTTokenizer
from megatron_patch.folder_lock import FolderInUse, hold_folder
from megatron_patch.parent_watch import call_when_parent_ends
from megatron_patch.training import arguments
from megatron_patch.training import checkpoint_paths, kernels
from megatron_patch.training.background_saves import BackgroundSaves
from megatron_patch.training.checkpoint_match import check_checkpoint_fits, check_save_folder
from megatron_patch.training.checkpointing import (NEW_RUN_FROM_ITS_WEIGHTS, CheckpointLayoutError,
                                                   RunState, SaveStrategy, load_checkpoint,
                                                   optimizer_format, save_checkpoint)
from megatron_patch.training.components import (encoder_settings, model_config,
                                                parameters_gathered, wrap_model)
from megatron_patch.training.console import keep_running_without_a_console
from megatron_patch.training.data_report import done_line, overlong_warning
from megatron_patch.training.fault_injection import fault_point
from megatron_patch.training.flops import peak_flops_per_device
from megatron_patch.training.garbage_collection import GarbageCollection
from megatron_patch.training.interval_stats import (IntervalStats, batch_flops, interval_metrics,
                                                    model_shapes)
from megatron_patch.training.memory_history import MemoryHistory
from megatron_patch.training.metrics import (METRICS_FILE, MetricsLogger, StepTimer,
                                             setup_logging, truncate_metrics_file)
from megatron_patch.training.optimizer import (build_optimizer, build_scheduler,
                                               learning_rates_by_module,
                                               schedule_kept_from_checkpoint)
from megatron_patch.training.parallel_setup import Ranks, all_reduce_host, initialize, shutdown
from megatron_patch.training.signals import EXIT_SIGNALLED, StopRequest, signal_from_name
from megatron_patch.training.train_step import guarded_optimizer_step, run_micro_batches

logger = logging.getLogger("megatron_patch.train")


class TooManySkippedSteps(RuntimeError):
    """Training diverged: the gradient norm stayed NaN/inf for too many steps in a row."""


SAVE_LOCK = ".run.lock"
SAVE_LOCK_WAIT_SECONDS = 120.0


class TooManyBadSamples(RuntimeError):
    """More than --max-bad-sample-fraction of the samples read do not decode."""


class DataReadError(RuntimeError):
    """The data loader failed (an unreadable shard, not a single bad sample)."""


def data_error_advice(data_path: str, resumed_loader: bool) -> str:
    """What to check when the loader fails: the shards (of each member of a blend), and, after a
    resume, whether the data still is what the checkpoint's loader state was saved for."""
    advice = "run " + " and ".join(f"tools/inspect_webdataset.py {folder} --validate"
                                   for folder in dataset_folders(data_path)) + \
        " to find a damaged shard"
    if resumed_loader:
        advice += ("; or, if the data (or the blend) changed since the checkpoint, its saved "
                   "loader state does not fit it: resume with the same data, or "
                   f"{NEW_RUN_FROM_ITS_WEIGHTS}")
    return advice


class Trainer:
    def __init__(self, args, ranks: Ranks, memory_history: Optional[MemoryHistory] = None):
        self.args, self.ranks, self.memory_history = args, ranks, memory_history
        self.save_lock = self.lock_save_folder() if args.save else None
        if args.save:
            checkpoint_writer.start()  # overlaps the first save's 2-3 s of setup with ours
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
        check_manifest(args.data_path)  # tars changed since conversion: fail before heavy work
        self.tokenizer = SFTTokenizer(args.tokenizer_path)
        # what each checkpoint records, so that a resume with other ones is refused
        self.tokenizer_fingerprint = self.tokenizer.fingerprint()
        self.data_fingerprint = train_data_fingerprint(args.data_path)
        self.cfg = model_config(args, self.tokenizer)
        arguments.validate_args(args, ranks.world_size, self.cfg)  # model-dependent checks
        self.echo_config()
        if args.load:
            check_checkpoint_fits(args.load, args, self.cfg, self.tokenizer,  # before building
                                  resuming=not args.finetune)
        check_save_folder(args)

        self.model, trainable = wrap_model(args, self.cfg, self.device)
        logger.info("trainable parameters on rank 0 by module: %s", trainable)
        self.model_chunks = [self.model]
        self.optimizer = build_optimizer(args, self.model_chunks)
        self.model.config.grad_scale_func = self.optimizer.scale_loss
        self.scheduler = build_scheduler(args, self.optimizer)
        self.optimizer_layout = optimizer_format(args.use_distributed_optimizer,
                                                 args.dist_ckpt_optim_fully_reshardable)
        self.state, loader_state = RunState(), None
        if args.load:
            loaded = load_checkpoint(args.load, self.model_chunks, self.optimizer, self.scheduler,
                                     ranks, weights_only=args.finetune, layout=self.optimizer_layout)
            for note in loaded.notes:
                logger.info("checkpoint: %s", note)
            kept = schedule_kept_from_checkpoint(self.scheduler, args) if loaded.resumed else []
            if kept:
                logger.warning(
                    "resuming keeps the learning-rate schedule saved with the checkpoint: %s. To "
                    "train on with the schedule asked for, %s", "; ".join(kept),
                    NEW_RUN_FROM_ITS_WEIGHTS)
            self.state, loader_state = loaded.state, loaded.loader_state
        if args.save and ranks.rank == 0:
            for path in checkpoint_paths.remove_unfinished_saves(args.save):
                logger.info("removed %s: a save that never finished", path)

        self.encoder = SFTTaskEncoder(self.tokenizer, encoder_settings(args))
        self.train_loader = build_train_loader(
            args.data_path, self.encoder, args.micro_batch_size, ranks.dp_rank, ranks.dp_size,
            args.num_workers, args.seed, args.shuffle_buffer_size)
        self.resumed_loader = loader_state is not None
        if self.resumed_loader:
            restore_loader_state(self.train_loader, loader_state, args.num_workers)
        self.train_batches = iter(self.train_loader)

        if ranks.rank == 0 and args.save:
            truncate_metrics_file(os.path.join(args.save, METRICS_FILE), self.state.iteration)
        # events of a dead run past the checkpoint we resume from are hidden in TensorBoard
        self.metrics = MetricsLogger(args.tensorboard_dir, enabled=ranks.rank == 0,
                                     run_config=vars(args), purge_step=self.state.iteration + 1)
        self.language_shape, self.vision_shape = model_shapes(self.cfg)
        self.recomputed_layers = kernels.recomputed_layers(args, self.cfg)
        self.peak_flops = peak_flops_per_device(
            torch.cuda.get_device_name() if torch.cuda.is_available() else None)
        self.warned_overlong = False  # once per process: the total is in the log lines' metrics
        self.stop_request = StopRequest([signal_from_name(name) for name in args.exit_signals])
        self.background_saves = BackgroundSaves() if args.async_save else None
        self.save_strategy = SaveStrategy(args.ckpt_fully_parallel_save,
                                          args.ckpt_assume_constant_structure)
        self.garbage = GarbageCollection(args.manual_gc, args.manual_gc_interval,
                                         args.manual_gc_eval)
        self.started = time.time()

    # ------------------------------------------------------------------ setup helpers
    def echo_config(self) -> None:
        if self.ranks.rank != 0:
            return
        record = {"args": vars(self.args), "model": self.cfg.to_dict(),
                  "world": {"world_size": self.ranks.world_size, "data_parallel": self.ranks.dp_size},
                  "kernels": kernels.summary(self.args)}
        text = json.dumps(record, indent=1, sort_keys=True, default=str)
        logger.info("configuration:\n%s", text)
        if self.args.save:
            with open(os.path.join(self.args.save, "run_config.json"), "w") as handle:
                handle.write(text + "\n")

    @property
    def counts_data(self) -> bool:
        """This rank counts data statistics for its replica (see interval_stats)."""
        return self.ranks.tp_rank == 0 and self.ranks.pp_rank == 0

    @property
    def counts_loss(self) -> bool:
        return self.ranks.tp_rank == 0 and self.ranks.is_last_stage

    # ------------------------------------------------------------------ the loop
    def train(self) -> int:
        """Runs the iterations; returns the exit status once every checkpoint is written."""
        try:
            with self.garbage:
                code = self.run_iterations()
        except BaseException:
            if self.background_saves:
                self.background_saves.abort()  # it cannot be published without this run
            raise
        if self.background_saves:
            self.background_saves.wait()
        return code

    def run_iterations(self) -> int:
        args, state = self.args, self.state
        stats, timer = IntervalStats(), StepTimer()
        interval_start, consecutive_skips = time.time(), 0
        logger.info("training from iteration %d to %d", state.iteration, args.train_iters)
        while state.iteration < args.train_iters:
            outcome = self.train_step(stats, timer)
            if self.memory_history:
                self.memory_history.after_step()
            state.iteration += 1
            state.consumed_samples += args.global_batch_size
            if outcome.stepped:
                self.scheduler.step(increment=args.global_batch_size)
                consecutive_skips = 0
            else:
                state.skipped_steps += 1
                stats.skipped += 1
                consecutive_skips += 1
                logger.warning("iteration %d: gradient norm %s, step skipped (%d in a row)",
                               state.iteration, outcome.grad_norm, consecutive_skips)
                if consecutive_skips >= args.max_consecutive_skips:
                    raise TooManySkippedSteps(
                        f"{consecutive_skips} steps in a row had a NaN/inf gradient norm (last at "
                        f"iteration {state.iteration}); lower --lr (or --lr-vision when the vision "
                        "tower is unfrozen), check the data, or resume from an earlier checkpoint")
            stats.iterations += 1
            stats.last_grad_norm = outcome.grad_norm
            fault_point("step", state.iteration, self.ranks.rank)
            if self.background_saves:
                self.background_saves.poll()  # publishes a checkpoint whose writes finished
            self.garbage.after_step(state.iteration)

            if state.iteration % args.log_interval == 0 or state.iteration == args.train_iters:
                self.log_interval(stats, timer, time.time() - interval_start)
                stats, interval_start = IntervalStats(), time.time()
            paused = time.time()  # evaluation and saving do not count as training time
            if args.eval_interval and state.iteration % args.eval_interval == 0:
                self.evaluate()
            stop_reason = self.stop_reason()
            if stop_reason and stats.iterations:  # the steps since the last log line
                self.log_interval(stats, timer, paused - interval_start)
                stats = IntervalStats()
            if self.should_save(stop_reason):
                self.save()
            interval_start += time.time() - paused
            if stop_reason:
                logger.info("stopping at iteration %d: %s", state.iteration, stop_reason)
                return EXIT_SIGNALLED if self.stop_request.requested else 0
        if args.eval_interval and state.iteration % args.eval_interval:
            self.evaluate()
        logger.info("%s", done_line(state))
        return 0

    def train_step(self, stats: IntervalStats, timer: StepTimer):
        args = self.args
        timer.start("data_wait")
        micro_batches = [self.next_batch() for _ in range(args.num_microbatches)]
        timer.start("forward_backward")
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        poison = args.debug_nan_at_iteration == self.state.iteration + 1
        loss_pair = run_micro_batches(self.model_chunks, micro_batches, args.seq_length,
                                      args.micro_batch_size, self.device, forward_only=False,
                                      poison=poison)
        timer.start("optimizer")
        outcome = guarded_optimizer_step(self.optimizer, args.clip_grad)
        timer.stop()
        if self.counts_loss:
            stats.add_loss(loss_pair)
        if self.counts_data:
            recompute = kernels.recomputed_flops(args)
            chunked_loss = kernels.loss_chunk_tokens(args) > 0
            for batch in micro_batches:
                flops = batch_flops(batch, self.language_shape, self.vision_shape, recompute,
                                    chunked_loss, self.recomputed_layers)
                stats.add_batch(batch, flops)
        return outcome

    def next_batch(self):
        """The next micro-batch. Single bad samples are skipped inside the loader. An error that
        reaches here is either our encoder's stop (too many over-long or undecodable samples in a
        row), raised as itself rather than in energon's wrapping, or the loader's own (an
        unreadable shard), where we name what changed if we can."""
        try:
            return next(self.train_batches)
        except Exception as error:
            stop = find_data_stop(error)  # the data cannot give a batch: the message says why
            if stop is not None:
                raise stop from None
            try:
                check_manifest(self.args.data_path)
                changed = ""
            except DatasetChangedError as found:
                changed = f"\n{found}"
            advice = data_error_advice(self.args.data_path, self.resumed_loader)
            raise DataReadError(
                f"reading training data from {self.args.data_path} failed: "
                f"{type(error).__name__}: {error}{changed}\n{advice}") from error

    def log_interval(self, stats: IntervalStats, timer: StepTimer, seconds: float) -> None:
        totals = stats.reduce()  # collective: every rank takes part
        gc_seconds, gc_collections = self.garbage.take()
        self.state.dropped_overlong += int(totals["dropped_overlong"])
        self.state.bad_samples += int(totals["bad_samples"])
        self.state.samples_read += int(totals["samples"] + totals["dropped_overlong"]
                                       + totals["bad_samples"])
        self.state.floating_point_operations += totals["model_flops"]
        self.check_bad_samples()
        if self.state.dropped_overlong and not self.warned_overlong:
            self.warned_overlong = True
            if self.ranks.rank == 0:
                logger.warning("%s", overlong_warning(self.state, self.args.seq_length))
        if self.ranks.rank != 0:
            return
        phases = {name: spent / stats.iterations for name, spent in timer.reset().items()}
        values = interval_metrics(totals, seconds, self.ranks.world_size, self.peak_flops, phases)
        for module, lr in learning_rates_by_module(self.optimizer, self.args).items():
            values[f"lr/{module}"] = lr
        values["train/grad_norm"] = stats.last_grad_norm
        values["train/skipped_steps"] = self.state.skipped_steps
        values["train/loss_scale"] = float(self.optimizer.get_loss_scale())
        values["data/dropped_overlong"] = self.state.dropped_overlong
        values["data/bad_samples"] = self.state.bad_samples
        values["data/truncated"] = totals["truncated"]
        values["time/iteration_sec"] = seconds / stats.iterations
        values["time/gc_sec"] = gc_seconds / stats.iterations
        values["gc/collections"] = gc_collections
        values["train/consumed_samples"] = self.state.consumed_samples
        self.metrics.scalars(self.state.iteration, values)
        self.metrics.console(self.state.iteration, self.args.train_iters, values,
                             seconds / stats.iterations)
        self.append_metrics_record(values)

    def check_bad_samples(self) -> None:
        """Same totals on every rank (all-reduced), so every rank takes the same decision."""
        bad, read = self.state.bad_samples, self.state.samples_read
        limit = self.args.max_bad_sample_fraction
        if bad >= arguments.MIN_BAD_SAMPLES_TO_STOP and bad > limit * read:
            raise TooManyBadSamples(
                f"{bad} of {read} samples read ({100 * bad / max(read, 1):.2f}%) did not decode, "
                f"more than --max-bad-sample-fraction {limit}; the warnings above name their "
                f"shards and keys. Check the data with tools/inspect_webdataset.py "
                f"{self.args.data_path} --validate and re-convert the damaged shards")

    def append_metrics_record(self, values: dict) -> None:
        """Full-precision copy of the logged values, one JSON line per log step ($SAVE)."""
        if not self.args.save:
            return
        with open(os.path.join(self.args.save, METRICS_FILE), "a") as handle:
            handle.write(json.dumps({"iteration": self.state.iteration, **values}) + "\n")

    def evaluate(self) -> Optional[float]:
        """Mean loss per assistant token over up to --eval-iters global batches of the val split
        (from its start). The last, partial global batch counts: with --eval-iters covering the
        split, the loss is over all of it, whatever the batch size and parallel layout."""
        args = self.args
        loader = build_val_loader(args.data_path, self.encoder, args.micro_batch_size,
                                  self.ranks.dp_rank, self.ranks.dp_size, args.num_workers)
        if loader is None:
            return None
        self.garbage.before_eval()
        batches = iter(loader)
        total = torch.zeros(2, dtype=torch.float64)
        self.model.eval()
        with torch.no_grad(), parameters_gathered(self.model):
            for _ in range(args.eval_iters):
                micro = [with_full_rows(batch, args.micro_batch_size)
                         for batch in itertools.islice(batches, args.num_microbatches)]
                if self.all_ranks_have(not micro):
                    break  # the split is done on every rank
                if not micro:
                    continue  # a forward pass has no data-parallel collective: others go on
                pair = run_micro_batches(self.model_chunks, micro, args.seq_length,
                                         args.micro_batch_size, self.device, forward_only=True)
                if self.counts_loss:
                    total += pair
        self.model.train()
        close_loader(loader)
        self.garbage.after_eval()
        total = all_reduce_host(total)
        if total[1] == 0:
            logger.info("evaluation: the val split gave no assistant tokens to score (empty, or "
                        "every sample over --seq-length)")
            return None
        loss = float(total[0] / total[1])
        logger.info("evaluation at iteration %d: loss %.4f over %d tokens",
                    self.state.iteration, loss, int(total[1]))
        self.metrics.scalars(self.state.iteration, {"eval/loss": loss})
        return loss

    # ------------------------------------------------------------------ stopping and saving
    def lock_save_folder(self):
        """Rank 0 locks --save for this run (folder_lock.py), waiting a while for a holder to
        end (a restart's previous job may still be finishing its last save); every rank raises
        if it cannot."""
        save, lock, refusal = self.args.save, None, None
        if self.ranks.rank == 0:
            try:
                lock = hold_folder(save, SAVE_LOCK, wait_seconds=SAVE_LOCK_WAIT_SECONDS, refusal=(
                    f"another run ({{holder}}) is using --save {save}: two runs in one folder "
                    "would overwrite each other's checkpoints. Stop it (or wait for it to end) "
                    "and rerun, or choose another --save"))
            except FolderInUse as error:
                refusal = error
        if not self.all_ranks_have(refusal is None):
            raise refusal or FolderInUse(f"another run is using --save {save} (rank 0 names it)")
        return lock

    def all_ranks_have(self, flag: bool) -> bool:
        return int(all_reduce_host(torch.tensor([0 if flag else 1], dtype=torch.int32))) == 0

    def stop_reason(self) -> Optional[str]:
        args, state = self.args, self.state
        local = None
        if self.stop_request.requested:
            local = self.stop_request.reason
        elif args.exit_interval and state.iteration % args.exit_interval == 0:
            local = f"--exit-interval {args.exit_interval}"
        elif args.exit_duration_in_mins and time.time() - self.started > 60 * args.exit_duration_in_mins:
            local = f"--exit-duration-in-mins {args.exit_duration_in_mins}"
        # any rank's reason stops all of them (a signal may reach only some ranks)
        if self.all_ranks_have(local is None):
            return None
        return local or "another rank asked to stop"

    def should_save(self, stop_reason: Optional[str]) -> bool:
        args, iteration = self.args, self.state.iteration
        if not args.save:
            return False
        return bool(stop_reason or iteration == args.train_iters
                    or (args.save_interval and iteration % args.save_interval == 0))

    def save(self) -> None:
        """Saves this iteration; with --async-save it blocks only while the state is copied
        (after waiting for a previous checkpoint still being written)."""
        started, background = time.time(), self.background_saves
        if background and background.busy:
            logger.info("iteration %d: the previous checkpoint is still being written; "
                        "waiting for it (a longer --save-interval avoids this)",
                        self.state.iteration)
            background.wait()
        with parameters_gathered(self.model):
            path = save_checkpoint(
                self.args.save, self.model_chunks, self.optimizer, self.scheduler, self.state,
                save_loader_state(self.train_loader), self.ranks, vars(self.args),
                dataloader_mirror=self.args.dataloader_save, keep_last=self.args.keep_last,
                layout=self.optimizer_layout, strategy=self.save_strategy,
                background=background, tokenizer_fingerprint=self.tokenizer_fingerprint,
                data_fingerprint=self.data_fingerprint)
        blocked = time.time() - started
        if background:
            logger.info("%s: state copied in %.1f s, being written in the background", path,
                        blocked)
        else:
            logger.info("saved %s in %.1f s", path, blocked)
        self.metrics.scalars(self.state.iteration, {"time/save_blocking_sec": blocked})
        self.metrics.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    keep_running_without_a_console()  # a closed pipe or terminal must not end the run
    launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
    args = arguments.parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    arguments.validate_args(args, world_size)  # fails before any heavy work
    ranks = initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                       args.seed, args.distributed_timeout_minutes,
                       cuda_graphs=kernels.cuda_graph_segments(args) is not None)
    setup_logging(args.save, ranks.rank)
    memory_history = None
    if args.record_memory_history:  # before the model is built: its allocations count too
        memory_history = MemoryHistory(
            args.memory_snapshot_path or os.path.join(args.save, "memory_snapshot.pickle"),
            ranks.rank)
    try:
        trainer = Trainer(args, ranks, memory_history)
        if launcher is not None:
            # torchrun killed with SIGKILL (a scheduler's, `kill -9 -- -PGID`) cannot stop its
            # ranks, which run in sessions of their own: orphaned, they would train and save on
            # beside the job's restart in the same folder. They stop as on a signal instead
            call_when_parent_ends(launcher, lambda: trainer.stop_request.request(
                "the launcher (torchrun) ended"))
        code = trainer.train()
        trainer.metrics.close()
        return code
    except arguments.ArgumentError:
        raise
    except BaseException as error:
        logger.error("rank %d failed: %s: %s", ranks.rank, type(error).__name__, error)
        # rerunning helps after a crash, not when the checkpoint or its loader state cannot
        # serve this command
        hopeless = (CheckpointLayoutError, LoaderStateMismatch, FolderInUse)
        if ranks.rank == 0 and args.save and not isinstance(error, hopeless):
            logger.error("%s", checkpoint_paths.resume_hint(args.save))
        raise
    finally:
        shutdown()
