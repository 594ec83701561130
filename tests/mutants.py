"""Mutation check: break each central claim on purpose and see that the tests guarding it fail.

    python -m tests.mutants                 # every mutant (about 6 minutes on 2 CPU cores)
    python -m tests.mutants stop_checkpoint weights_only
    python -m tests.mutants --list

Each mutant is one textual change to one file. It is applied to a scratch copy of the repository
(the package, tests, bench, configs and entry point), and only the tests named for it run there, against
that copy. "killed" means they failed, as they must; "SURVIVED" means the claim is not guarded.
Exit status 1 if any mutant survives. The table is in docs/testing.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COPIED = ("rnnddp", "tests", "bench", "configs", "slurm", "train_ddp.py", "pyproject.toml")
DATA_ROOT = Path(os.environ.get("RNNDDP_TEST_DATA", REPO.parent / "shared" / "data"))


@dataclass(frozen=True)
class Mutant:
    name: str
    claim: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


# The stop-position fix reverted: the stop checkpoint is taken before the step's own work (an epoch's end:
# validation, save, the next epoch's position), as it was. Guarded by its own test and found by the journeys.
_STOP_BLOCK = """                    if vote(self.stop.requested):
                        vote.close()
                        self._log_window(bar)
                        if not saved:
                            self._save()
                        dist.barrier(info)  # nobody exits while rank 0 still writes (other nodes' torchrun)
                        log.warning(
                            "stopped on %s at step %d: checkpoint saved",
                            self.stop.name or "a peer's signal",
                            self.global_step,
                        )
                        self.logger.event("stopped", self.global_step, signal=self.stop.name)
                        return "stopped"
"""
_STEP_WORK = """                    saved = self._after_step(bar)
                    if self.finished:  # the last step finishes the run instead: test (seconds), exit 0
                        break
"""
STOP_POSITION = (
    _STEP_WORK + _STOP_BLOCK,
    "                    saved = False\n"
    + _STOP_BLOCK.replace("if vote(", "if not self.finished and vote(", 1)
    + _STEP_WORK,
)


MUTANTS = [
    Mutant(
        "denormal_flush",
        "the job flushes denormals to zero before any tensor work",
        "train_ddp.py",
        "        dist.flush_denormals(cfg.train.flush_denormals)  # before any tensor work (see there)\n",
        "",
        ("tests/unit/test_denormals.py::test_the_job_flushes_before_its_first_tensor_work",),
    ),
    Mutant(
        "stored_permutation",
        "evaluate and predict use the pixel order the checkpoint stored",
        "rnnddp/tasks/classify.py",
        'if self.view.permutation is not None and state.get("permutation") is not None:',
        "if False:",
        ("tests/unit/test_views_and_datasets.py::test_model_view_forward_backward_save_and_reload",),
    ),
    Mutant(
        "stop_checkpoint",
        "a stop signal saves a checkpoint at the step boundary before exit 75",
        "rnnddp/train/trainer.py",
        "                        self._save()\n                        dist.barrier(info)",
        "                        dist.barrier(info)",
        ("tests/e2e/test_faults.py::test_one_process_stops_at_the_next_step_and_exits_75",),
    ),
    Mutant(
        "stop_on_last_step",
        "a stop request on the last step finishes the run (validated, tested)",
        "rnnddp/train/trainer.py",
        "                    if self.finished:  # the last step finishes the run instead: test (seconds), exit 0\n",
        "                    if False:\n",
        ("tests/unit/test_trainer_loop.py",),
    ),
    Mutant(
        "stop_vote",
        "a signal to one rank stops every rank (the vote)",
        "rnnddp/dist.py",
        "            agreed = self._buf.item() > 0",
        "            agreed = flag",
        (
            "tests/e2e/test_faults.py::test_stop_signal_checkpoints_at_the_step_boundary_and_resumes_exactly[SIGUSR1 to rank 1 only]",
        ),
    ),
    Mutant(
        "comm_hook_choice",
        "dist.grad_sync=auto averages gradients by one all-gather on gloo with <= 4 ranks",
        "rnnddp/dist.py",
        'return "allgather" if info.backend == "gloo" and info.world_size <= 4 else "allreduce"',
        'return "allreduce"',
        ("tests/e2e/test_ddp.py::test_two_ranks_match_one_process[auto]",),
    ),
    Mutant(
        "comm_hook_mean",
        "the all-gather hook gives every rank the rank-order mean, bit for bit",
        "rnnddp/dist.py",
        "out.view(world, -1).sum(dim=0).div_(world)",
        "out.view(world, -1).sum(dim=0).div_(world).add_(buf * 1e-7)",
        ("tests/e2e/test_ddp.py::test_allgather_hook_gives_every_rank_the_same_mean_bit_for_bit",),
    ),
    Mutant(
        "sampler_set_epoch",
        "the data are reshuffled every epoch, as a function of seed and epoch",
        "rnnddp/data/batches.py",
        "    sampler.set_epoch(epoch)\n",
        "",
        ("tests/unit/test_data.py::test_reshuffled_every_epoch_and_resume_skips_consumed_batches",),
    ),
    Mutant(
        "atomic_rename",
        "a checkpoint is written to a temporary name and renamed only when complete",
        "rnnddp/checkpoint.py",
        'fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=path.name + ".tmp.")',
        "fd, tmp = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), str(path)",
        ("tests/e2e/test_faults.py::test_a_process_killed_mid_save_leaves_latest_intact_and_its_leftover_is_removed",),
    ),
    Mutant(
        "checksum",
        "a damaged newest checkpoint is skipped for the one before",
        "rnnddp/checkpoint.py",
        "if marker.read_text().strip() != sha256_file(path):",
        "if False:",
        ("tests/unit/test_checkpoint.py::test_damaged_newest_falls_back_to_previous",),
    ),
    Mutant(
        "leftover_cleanup",
        "the temporary file of a killed save is removed at the next start",
        "rnnddp/job.py",
        "    manager.clean_leftovers()",
        "    pass",
        ("tests/e2e/test_faults.py::test_a_process_killed_mid_save_leaves_latest_intact_and_its_leftover_is_removed",),
    ),
    Mutant(
        "weights_only",
        "checkpoints load with weights_only=True: pickled code never runs",
        "rnnddp/checkpoint.py",
        'map_location="cpu", weights_only=True)',
        'map_location="cpu", weights_only=False)',
        ("tests/unit/test_checkpoint.py::test_pickled_code_is_refused_and_never_runs",),
    ),
    Mutant(
        "val_split_is_test",
        "the validation split is held out of the training set, not the test set",
        "rnnddp/tasks/classify.py",
        "            train, val = hold_out(train, data.val_size, VAL_SEED)",
        "            val = test",
        ("tests/unit/test_validation_split.py::test_classify_holds_out_val_size_training_images_not_test_ones",),
    ),
    Mutant(
        "select_on_test",
        "model selection (validation during training, best.pt) never looks at the test set",
        "rnnddp/job.py",
        '        val = splits.val.to(info.device) if info.device.type == "cuda" else splits.val',
        "        val = splits.test",
        ("tests/e2e/test_model_selection.py::test_best_checkpoint_is_the_best_validation_result_and_test_comes_last",),
    ),
    Mutant(
        "best_direction",
        "best.pt holds the best validation result (higher accuracy, lower MSE)",
        "rnnddp/metrics.py",
        "return value > best if self.higher_is_better else value < best",
        "return value < best if self.higher_is_better else value > best",
        ("tests/e2e/test_model_selection.py::test_best_checkpoint_is_the_best_validation_result_and_test_comes_last",),
    ),
    Mutant(
        "old_format_refused",
        "a checkpoint from before the validation split is refused for resume (it trained on the validation images)",
        "rnnddp/job.py",
        '    if state.get("format", 1) < CHECKPOINT_FORMAT:',
        "    if False:",
        (
            "tests/e2e/test_model_selection.py::test_a_checkpoint_from_before_the_validation_split_is_refused_but_evaluates",
        ),
    ),
    Mutant(
        "wandb_run_id",
        "a resumed job continues the same W&B run, each step logged once",
        "rnnddp/job.py",
        'run_id = state.get("wandb_run_id") if state else new_run_id()',
        "run_id = new_run_id()",
        ("tests/e2e/test_ddp.py::test_resume_auto_continues_and_finished_run_exits_0",),
    ),
    Mutant(
        "grad_clip",
        "train.grad_clip bounds the gradient norm",
        "rnnddp/train/step.py",
        "        if self.grad_clip > 0:",
        "        if False:",
        ("tests/unit/test_claims.py::test_grad_clip_bounds_the_update_and_zero_turns_it_off",),
    ),
    Mutant(
        "carried_state",
        "the sine task carries the hidden state from chunk to chunk",
        "rnnddp/tasks/sine_regression.py",
        "        self.carried.keep(state)",
        "        self.carried.reset()",
        ("tests/unit/test_sine.py::test_the_loss_carries_the_hidden_state_into_the_next_chunk",),
    ),
    Mutant(
        "nonfinite_save",
        "a model that just produced a non-finite loss is never saved: latest stays good",
        "rnnddp/train/trainer.py",
        "        if dist.max_value(self._window.bad_run.float()).item() > 0:",
        "        if False:",
        ("tests/e2e/test_faults.py::test_nonfinite_loss_stops_with_the_last_good_checkpoint_latest",),
    ),
    Mutant(
        "wandb_fallback",
        "online W&B without a server falls back to offline and keeps what was logged",
        "rnnddp/metrics.py",
        "            wandb.teardown()  # W&B's service still holds",
        "            pass  # W&B's service still holds",
        ("tests/e2e/test_claims.py::test_wandb_online_without_a_server_falls_back_to_offline_and_loses_nothing",),
    ),
    Mutant(
        "eval_precision",
        "evaluate runs in the precision the run used",
        "rnnddp/evaluate.py",
        "precision = resolve_precision(r.cfg.train.precision, device)",
        'precision = resolve_precision("fp32", device)',
        ("tests/e2e/test_claims.py::test_evaluate_uses_the_precision_the_run_trained_in",),
    ),
    Mutant(
        "wandb_skip_known",
        "after a crash W&B does not get again the steps it already holds",
        "rnnddp/metrics.py",
        "        if step > self._wandb_has:",
        "        if True:",
        ("tests/unit/test_wandb_resume.py::test_steps_that_wandb_holds_are_not_logged_again_when_redone",),
    ),
    Mutant(
        "wandb_backfill",
        "after a crash W&B gets from metrics.jsonl the steps its killed service lost",
        "rnnddp/metrics.py",
        "        if resumed_at is not None and resumed_at > self._wandb_has:",
        "        if False:",
        ("tests/unit/test_wandb_resume.py",),
    ),
    Mutant(
        "peer_timeout",
        "a training-step collective gives up on a silent peer after dist.peer_timeout_s",
        "rnnddp/dist.py",
        "world_size=world_size, timeout=peer_timeout, **kwargs",
        "world_size=world_size, timeout=timeout, **kwargs",
        ("tests/e2e/test_hosts.py::test_a_cut_link_is_noticed_within_the_peer_timeout_and_exits_resumable",),
    ),
    Mutant(
        "wait_group",
        "the others wait for rank 0's validation in the long-timeout group",
        "rnnddp/dist.py",
        "    dist.broadcast(buf, src=0, group=info.wait_group)",
        "    dist.broadcast(buf, src=0)",
        ("tests/e2e/test_ddp.py::test_rank_zero_work_longer_than_the_peer_timeout_is_waited_for",),
    ),
    Mutant(
        "lost_peer_exit",
        "a rank that lost a peer says so in one line and exits 75",
        "rnnddp/dist.py",
        "and any(marker in text for marker in LOST_PEER_MARKERS)",
        "and False",
        (
            "tests/e2e/test_hosts.py::test_a_killed_host_is_noticed_and_the_survivor_restarts_smaller_and_finishes",
            "tests/e2e/test_lost_peer.py::test_real_gloo_errors_from_bugs_are_not_lost_peers_and_a_killed_or_silent_peer_is",
        ),
    ),
    Mutant(
        "lost_node_requeue",
        "under SLURM a job that lost a node is requeued",
        "slurm/train.sbatch",
        'if [[ "$rc" -ne 0 ]] && lost_a_node; then',
        "if false; then",
        ("tests/e2e/test_slurm_two_nodes.py::test_a_lost_node_is_requeued_and_the_job_finishes",),
    ),
    Mutant(
        "memory_mapped",
        "a prepared split is memory-mapped: a data set larger than the job's memory trains",
        "rnnddp/data/sequences.py",
        '                return np.load(f, mmap_mode="r")',
        "                return np.load(f)",
        ("tests/e2e/test_larger_than_memory.py",),
    ),
    Mutant(
        "step_loss_global",
        "a per-step loss is the mean over the global batch's real steps: the same on 1 or N ranks",
        "rnnddp/tasks/step_targets.py",
        "        return total * (self.info.world_size / batch.global_steps)",
        "        return total / (batch.y != IGNORE).sum()",
        (
            "tests/unit/test_step_targets.py::test_the_gradient_of_a_step_is_the_same_on_one_rank_and_split_over_two",
            "tests/e2e/test_step_targets.py::test_a_mid_epoch_resume_on_another_number_of_ranks_continues_exactly",
        ),
    ),
    Mutant(
        "step_mask",
        "the per-step regression loss counts each sequence's real steps only",
        "rnnddp/tasks/step_targets.py",
        "        squared = ((out.float() - batch.y) ** 2).sum(dim=2) * real_steps(batch)",
        "        squared = ((out.float() - batch.y) ** 2).sum(dim=2)",
        ("tests/unit/test_step_targets.py::test_the_gradient_of_a_step_is_the_same_on_one_rank_and_split_over_two",),
    ),
    Mutant(
        "step_padding_target",
        "a padding step has no class (cross_entropy's ignore_index)",
        "rnnddp/data/sequences.py",
        "np.full(shape, IGNORE, dtype=np.int64)",
        "np.zeros(shape, dtype=np.int64)",
        ("tests/unit/test_step_targets.py",),
    ),
    Mutant(
        "tagger_packed",
        "a bidirectional per-step network runs packed: padding changes no real step's output",
        "rnnddp/models.py",
        "        if lengths is None or not self.rnn.bidirectional:",
        "        if True:",
        ("tests/unit/test_models.py::test_a_padded_batch_tags_each_step_as_each_sequence_alone",),
    ),
    Mutant(
        "row_major",
        "a prepared split is stored row-major: each sequence is one contiguous range of its file",
        "rnnddp/data/sequences.py",
        "np.ascontiguousarray(np.concatenate(features), dtype=np.float32)",
        "np.concatenate(features).astype(np.float32)",
        ("tests/unit/test_prepare.py::test_japanese_vowels_prepares_with_a_stratified_validation_split",),
    ),
    Mutant(
        "missing_trailing",
        "missing values at the end of a sequence shorten it (the UEA archive's unequal lengths), not refused",
        "rnnddp/data/readers.py",
        "    length = int(steps[-1]) + 1\n",
        "    length = len(seq)\n",
        (
            "tests/unit/test_prepare.py::test_trailing_missing_values_shorten_a_sequence_and_the_stats_are_of_real_values",
            "tests/unit/test_prepare.py::test_npz_nan_rows_at_the_end_shorten_and_nan_inside_is_refused_or_filled",
        ),
    ),
    Mutant(
        "lost_peer_narrow",
        "only a closed or reset connection or a timeout is a lost peer: a DistError from a bug exits 1 with its traceback",
        "rnnddp/dist.py",
        "    return isinstance(error, RuntimeError) and any(",
        "    return isinstance(error, dist.DistError) or isinstance(error, RuntimeError) and any(",
        (
            "tests/unit/test_architecture.py::test_gloo_errors_of_a_lost_peer_are_recognised",
            "tests/e2e/test_lost_peer.py",
        ),
    ),
    Mutant(
        "stop_position",
        "a stop on an epoch's last step saves the next epoch's start (its work done first), so it resumes",
        "rnnddp/train/trainer.py",
        *STOP_POSITION,
        ("tests/e2e/test_resume_edges.py::test_a_stop_after_every_step_position_resumes_bit_exact",),
    ),
    Mutant(
        "stop_position_load",
        "a checkpoint written past an epoch's end (by the old stop) resumes at the next epoch's start",
        "rnnddp/train/trainer.py",
        "        if self.step_in_epoch >= self.batches.steps_per_epoch:",
        "        if False:",
        ("tests/e2e/test_resume_edges.py::test_an_old_stop_checkpoint_past_an_epoch_end_resumes_at_the_next_epoch",),
    ),
    Mutant(
        "resume_refusal",
        "a rerun with another setting is refused in one line, nothing written (not half-applied)",
        "rnnddp/resume.py",
        "    if refused:",
        "    if False:",
        (
            "tests/unit/test_resume_rules.py::test_another_setting_is_refused_naming_the_key_both_values_and_both_fixes",
            "tests/e2e/test_resume_edges.py::test_a_rerun_with_another_setting_is_refused_in_one_line_and_writes_nothing",
        ),
    ),
    Mutant(
        "resume_view",
        "a checkpoint does not resume under another view (rows and columns have the same shape)",
        "rnnddp/resume.py",
        "    refused = [k for k in differ if not is_safe(k, task_safe) and k not in LENGTH]",
        '    refused = [k for k in differ if not is_safe(k, task_safe) and k not in LENGTH and k != "data.view"]',
        ("tests/unit/test_resume_rules.py",),
    ),
    Mutant(
        "schedule_replanned",
        "a lengthened run's next step takes the longer schedule's LR",
        "rnnddp/train/trainer.py",
        """        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
""",
        "",
        ("tests/unit/test_resume_rules.py::test_a_lengthened_run_takes_its_next_step_at_the_longer_schedules_lr",),
    ),
    Mutant(
        "checkpoint_agreement",
        "every rank loads the checkpoint rank 0 picked, byte for byte, or the job stops naming the rank",
        "rnnddp/resume.py",
        "        elif checkpoint.sha256_file(path) != digest:",
        "        elif False:",
        ("tests/e2e/test_multinode.py::test_ranks_that_see_different_checkpoints_stop_naming_the_rank_and_the_file",),
    ),
    Mutant(
        "stalled_restarts",
        "restarts that resume from the same checkpoint again and again stop after dist.max_stalled_restarts",
        "rnnddp/resume.py",
        "        if auto and limit and stalled >= limit:",
        "        if False:",
        (
            "tests/unit/test_resume_rules.py::"
            "test_an_automatic_restart_after_the_limit_stops_with_one_line_and_a_hand_rerun_goes_on",
        ),
    ),
    Mutant(
        "nonfinite_scaler",
        "non-finite losses under a GradScaler are divergence (exit 3), not a finished run",
        "rnnddp/train/trainer.py",
        "        if limit and worst_run >= limit:",
        "        if not self.scaler.is_enabled() and limit and worst_run >= limit:",
        (
            "tests/unit/test_trainer_loop.py::"
            "test_nonfinite_losses_under_a_grad_scaler_are_divergence_not_a_finished_run",
        ),
    ),
    Mutant(
        "download_atomic",
        "a data download is renamed into place file by file: nobody sees a partial file",
        "rnnddp/data/mnist.py",
        """        cls(str(tmp), train=True, download=True)
        cls(str(tmp), train=False, download=True)
""",
        """        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
        return
""",
        ("tests/unit/test_download.py",),
    ),
    Mutant(
        "eval_streamed",
        "rank 0 evaluates a sequence split in batches read from the mapped files, never the whole split at once",
        "rnnddp/tasks/prepared.py",
        """        for start in range(0, len(split), self.cfg.eval.batch_size):
            index = order[start : start + self.cfg.eval.batch_size]
""",
        """        for start in range(0, len(split), len(split)):  # the whole split as one batch
            index = order[start : start + len(split)]
""",
        ("tests/unit/test_eval_memory.py::test_evaluation_holds_no_per_step_array_of_the_whole_split",),
    ),
    Mutant(
        "carry_keeps_nothing",
        "the one carried-state mechanism keeps the state it is given (both the sine task and the language model)",
        "rnnddp/train/carry.py",
        "        self.state = detach_state(state)",
        "        self.state = None",
        (
            "tests/unit/test_sine.py::test_the_loss_carries_the_hidden_state_into_the_next_chunk",
            "tests/unit/test_streams.py::test_the_language_model_loss_carries_every_stripes_state_into_the_next_step",
            "tests/e2e/test_language_model.py::test_a_dependency_longer_than_bptt_is_learnt_through_the_carried_state",
        ),
    ),
    Mutant(
        "lm_carried_state",
        "the language model carries every stripe's state from step to step",
        "rnnddp/tasks/language_model.py",
        "        self.carried.keep(state)",
        "        self.carried.reset()",
        ("tests/unit/test_streams.py::test_the_language_model_loss_carries_every_stripes_state_into_the_next_step",),
    ),
    Mutant(
        "lm_stripe_ownership",
        "each rank reads its own block of stripes",
        "rnnddp/data/streams.py",
        "        self.owned = block_rows(rank, world_size, global_batch_size)",
        "        self.owned = block_rows(0, world_size, global_batch_size)",
        (
            "tests/unit/test_streams.py::test_ranks_own_blocks_of_stripes_and_together_make_the_one_rank_batch",
            "tests/e2e/test_language_model.py::test_one_rank_two_ranks_and_two_launchers_train_the_same_model",
        ),
    ),
    Mutant(
        "lm_state_rows",
        "the checkpoint orders the stripes' states as the stream's stripes, so another rank count re-slices them",
        "rnnddp/tasks/language_model.py",
        "        self.carried = CarriedState(info, cfg.train.global_batch_size, block_rows)",
        "        self.carried = CarriedState(info, cfg.train.global_batch_size)",
        (
            "tests/e2e/test_language_model.py::test_a_sigkill_resumes_bit_for_bit_and_a_stop_resumes_on_another_number_of_ranks",
        ),
    ),
    Mutant(
        "lm_state_in_checkpoint",
        "the checkpoint holds every stripe's state",
        "rnnddp/tasks/language_model.py",
        "            **self.carried.state_dict(),",
        "            **{k: None for k in self.carried.state_dict()},",
        (
            "tests/e2e/test_language_model.py::test_a_sigkill_resumes_bit_for_bit_and_a_stop_resumes_on_another_number_of_ranks",
        ),
    ),
    Mutant(
        "average_update",
        "average.mode=ema/asgd averages the weights after each step",
        "rnnddp/train/averaging.py",
        "            self.averaged.update_parameters(self.source)",
        "            pass",
        (
            "tests/unit/test_averaging.py::test_ema_is_the_moving_average_of_the_weights_after_each_step_from_start_step",
            "tests/unit/test_averaging.py::test_validation_best_pt_and_the_final_test_use_the_averaged_weights",
        ),
    ),
    Mutant(
        "averaged_weights_resume",
        "a resume takes the averaged weights back from the checkpoint",
        "rnnddp/train/averaging.py",
        '            self.averaged.module.load_state_dict(state["averaged_model"])',
        "            pass",
        ("tests/unit/test_averaging.py::test_a_job_stopped_and_resumed_ends_with_the_same_averaged_weights",),
    ),
    Mutant(
        "lost_peer_in_backward",
        "a peer lost during the gradient exchange fails the backward (the all-gather hook passes the error on)",
        "rnnddp/dist.py",
        "        gathered.wait()\n",
        "",
        (
            "tests/e2e/test_lost_peer.py::test_real_gloo_errors_from_bugs_are_not_lost_peers_and_a_killed_or_silent_peer_is",
        ),
    ),
    Mutant(
        "point_latest",
        "a run that resumes past a damaged newest checkpoint points latest at the one it continues from",
        "rnnddp/job.py",
        "    manager.point_latest(resume_path)\n",
        "",
        (
            "tests/e2e/test_resume_edges.py::test_journey_newest_damaged_then_killed_before_a_save_leaves_latest_on_a_complete_checkpoint",
        ),
    ),
    # The journeys (tests/journeys/) must find these three by walking, not by a test written for them.
    Mutant(
        "journeys_stop_position",
        "a stop on an epoch's last step resumes exactly (the stop_position fix), found by the fixed journeys",
        "rnnddp/train/trainer.py",
        *STOP_POSITION,
        ("tests/e2e/test_journeys.py",),
    ),
    Mutant(
        "journeys_resume_refusal",
        "a rerun with an unsafe setting is refused, nothing written, found by the fixed journeys",
        "rnnddp/resume.py",
        "    if refused:",
        "    if False:",
        ("tests/e2e/test_journeys.py",),
    ),
    Mutant(
        "journeys_commit_marker",
        "a checkpoint counts once its .sha256 marker is written, before latest moves, found by the fixed journeys",
        "rnnddp/checkpoint.py",
        '            write_atomic(Path(str(path) + ".sha256"), (digest + "\\n").encode())\n',
        "",
        ("tests/e2e/test_journeys.py",),
    ),
    Mutant(
        "export_state",
        "an exported language model continues from the state it is given",
        "rnnddp/export/graphs.py",
        "            x, s = self.run(layer, x, None, _pack(layer, state[k * n : (k + 1) * n]))",
        "            x, s = self.run(layer, x, None, None)",
        ("tests/e2e/test_export.py::test_language_model_stepped_with_its_state_gives_the_jobs_test_figure",),
    ),
    Mutant(
        "export_time_length",
        "an exported model takes any time length, not only its example's",
        "rnnddp/export/write.py",
        "    return {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}",
        '    return {i: d for i, d in enumerate(t.shape) if d == "batch"}',
        ("tests/e2e/test_export.py::test_sequence_classifier_takes_any_batch_of_unequal_lengths",),
    ),
]


def scratch_copy(dest: Path) -> None:
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)


def apply(m: Mutant, root: Path) -> None:
    path = root / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        raise SystemExit(f"mutant {m.name}: the text to change occurs {text.count(m.old)} times in {m.file}, not once")
    path.write_text(text.replace(m.old, m.new))


def run(m: Mutant, timeout: float) -> tuple[str, float, str]:
    with tempfile.TemporaryDirectory(prefix=f"rnnddp-mutant-{m.name}-") as tmp:
        root = Path(tmp)
        scratch_copy(root)
        apply(m, root)
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
        env.setdefault("RNNDDP_TEST_DATA", str(DATA_ROOT))  # the copy has no ../shared beside it
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", *m.tests]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "killed (timeout)", time.perf_counter() - start, ""
        took = time.perf_counter() - start
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        if "skipped" in tail[0] or proc.returncode == 5:  # a skipped guard proves nothing either way
            return "error (skipped or no test)", took, tail[0]
        if proc.returncode == 0:
            return "SURVIVED", took, tail[0]
        if proc.returncode == 1:  # tests failed
            return "killed", took, tail[0]
        return f"error (pytest exit {proc.returncode})", took, tail[0]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.mutants", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="mutants to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutants and the tests that guard them")
    p.add_argument("--timeout", type=float, default=600, help="seconds per mutant")
    a = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not a.names or m.name in a.names]
    if unknown := set(a.names) - {m.name for m in MUTANTS}:
        p.error(f"unknown mutant(s) {', '.join(sorted(unknown))}; see --list")
    if a.list:
        for m in chosen:
            print(f"{m.name:20s} {m.file:34s} {m.claim}\n{'':20s} {' '.join(m.tests)}")
        return 0
    print("| mutant | claim | file | guarded by | result | s |")
    print("| --- | --- | --- | --- | --- | --- |")
    survived = 0
    for m in chosen:
        result, took, tail = run(m, a.timeout)
        survived += result == "SURVIVED"
        tests = ", ".join(f"`{t.split('::')[-1] if '::' in t else t}`" for t in m.tests)
        print(f"| `{m.name}` | {m.claim} | `{m.file}` | {tests} | {result} | {took:.0f} |", flush=True)
        if result.startswith("error") or result == "SURVIVED":
            print(f"    {tail}", file=sys.stderr)
    print(f"\n{len(chosen) - survived} killed, {survived} survived")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
