"""DeepSpeed on CPU (DeepSpeed's CPU accelerator, gloo): train_deepspeed.py overfits 16 real MSRA examples on the tiny
models and its adapter decodes the trained answers; a resumed run continues exactly; `deepspeed train_trainer.py`
trains with deepspeed.json (ZeRO-2); a finished run is never overwritten. Two processes with ZeRO-2 and ZeRO-3, under
the `deepspeed` launcher, under mpirun and under torchrun, train like one process with the same global batch and save
the whole adapter. Full fine-tuning with ZeRO-3 + CPU offload on two processes trains like one process, resumes from
its two-process checkpoint, and saves the whole model. Each launcher is run once per script; the other multi-process
runs use torchrun (conftest.run_script(..., ranks=N)); one-process runs run in the tests' process. The first DeepSpeed
process builds a small shm comm op once, the first offload run DeepSpeed's CPU Adam (about a minute); both are cached
in the tests' own extensions folder (see conftest.py)."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from conftest import FATAL_SIGNAL_TRACEBACKS, OVERFIT, REPO_ROOT, run_script, train_then_resume
from test_training import assert_adapter_reproduces_answers, assert_full_model_folder, final_train_loss, logged_losses
from utils.distributed import free_port
from utils.model_loading import load_model_and_tokenizer

# train_deepspeed.py has no report_to: it always writes TensorBoard logs. Both scripts use the Trainer's linear
# schedule (deepspeed.json names no scheduler); two warmup steps as a realistic setting.
WARMUP, LEARNING_RATE = "--warmup_steps=2", "--learning_rate=1.5e-2"
DS_OVERFIT = [arg for arg in OVERFIT if not arg.startswith("--report_to")] + [WARMUP, LEARNING_RATE]
# Steps (one epoch each) to memorise the 16 answers at learning rate 1.5e-2. The tiny ChatGLM-6B (130k vocabulary,
# 2-D positions) learns the slowest.
OVERFIT_STEPS = {"chatglm-6b": 50, "chatglm2-6b": 30, "chatglm3-6b": 30}
# Micro-batches per step of each version's run: gradient accumulation's loss must equal the one large batch's.
ACCUMULATION = {"chatglm-6b": 1, "chatglm2-6b": 2, "chatglm3-6b": 1}


SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*"


@pytest.fixture(scope="module", autouse=True)
def remove_shm_buffers():
    """DeepSpeed's CPU all-reduce leaves a 66 MB shared-memory file per rank and run in /dev/shm (deepspeed 0.19.8
    never calls its shared_close), which is RAM: the ones these tests' runs made go once the module is done."""
    before = set(glob.glob(SHM_BUFFERS))
    yield
    for path in set(glob.glob(SHM_BUFFERS)) - before:
        os.remove(path)


def run(script, *args, launcher="python", check=True, timeout=900):
    """run_script, or the script under the `deepspeed` launcher (what that command runs, with this Python whatever
    PATH holds)."""
    if launcher != "deepspeed":
        return run_script(script, *args, check=check, timeout=timeout)
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()), script, *args]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"deepspeed {script} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="module")
def overfit_runs(trainable_models, sixteen_examples, tmp_path_factory):
    """run(version) -> output folder of train_deepspeed.py overfitting the 16 examples (each run once per module)."""
    done = {}

    def get(version):
        if version not in done:
            run_dir, steps = tmp_path_factory.mktemp("ds_" + version) / "run", OVERFIT_STEPS[version]
            accumulation = ACCUMULATION[version]
            batching = [f"--per_device_train_batch_size={16 // accumulation}", f"--gradient_accumulation_steps={accumulation}"]
            run("train_deepspeed.py", f"--model_dir={trainable_models[version]}", f"--train_file={sixteen_examples}",
                f"--dev_file={sixteen_examples}", f"--output_dir={run_dir}", f"--max_steps={steps}", f"--save_steps={steps}",
                f"--eval_steps={steps}", *DS_OVERFIT, *batching)
            done[version] = run_dir
        return done[version]

    return get


@pytest.mark.parametrize("version", list(ACCUMULATION))
def test_train_deepspeed_overfits_and_the_adapter_reproduces_the_answers(version, overfit_runs, trainable_models, sixteen_examples):
    run_dir, steps = overfit_runs(version), OVERFIT_STEPS[version]
    adapter_dir = run_dir / "adapter_model"
    assert {"adapter_config.json", "adapter_model.safetensors", "train_args.json"} <= {p.name for p in adapter_dir.iterdir()}
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert list((run_dir / "runs").glob("events.out.tfevents.*"))
    checkpoint = run_dir / f"checkpoint-{steps}"
    assert (checkpoint / f"global_step{steps}").is_dir() and (checkpoint / "rng_state_0.pth").is_file()
    assert (checkpoint / "adapter_model.safetensors").is_file()
    losses = logged_losses(run_dir, steps)
    assert losses[steps] < 0.5 * losses[1], losses

    train_args = json.loads((adapter_dir / "train_args.json").read_text())
    assert train_args["script"] == "train_deepspeed.py" and train_args["model_version"] == version
    assert train_args["data"]["train"]["samples"] == 16 and train_args["world_size"] == 1
    ds_config = train_args["deepspeed_config"]
    assert ds_config["zero_optimization"]["stage"] == 2 and "auto" not in json.dumps(ds_config)
    assert ds_config["gradient_accumulation_steps"] == ACCUMULATION[version]
    metrics = train_args["metrics"]
    assert metrics["global_step"] == steps and metrics["train_tokens_per_second"] > 0 and metrics["eval_loss"] < 0.5
    assert_adapter_reproduces_answers(trainable_models[version], adapter_dir, sixteen_examples)


def test_train_deepspeed_resumed_run_ends_at_the_uninterrupted_loss(trainable_models, sixteen_examples, tmp_path):
    # 16 examples in micro-batches of 4, 3 per step: an epoch is a step of 3 micro-batches and one of 1. The
    # checkpoint at step 3 lies inside the second epoch and between two log lines, with LoRA dropout on.
    common = [f"--model_dir={trainable_models['chatglm2-6b']}", f"--train_file={sixteen_examples}", "--dev_file=none",
              "--max_steps=6", "--save_steps=3", *DS_OVERFIT, "--per_device_train_batch_size=4",
              "--gradient_accumulation_steps=3", "--learning_rate=3e-3", "--lora_dropout=0.1", "--logging_steps=2"]
    # An interruption after step 3: only checkpoint-3 survives.
    full, interrupted, result = train_then_resume(run, "train_deepspeed.py", tmp_path, common, 3, 6)
    assert f"resumed from {interrupted / 'checkpoint-3'} (step 3 of 6): epoch 1, 3 micro-batches into it" in result.stdout
    uninterrupted, resumed = logged_losses(full, 6), logged_losses(interrupted, 6)
    assert sorted(resumed) == sorted(uninterrupted) == [1, 2, 4, 6]
    assert resumed[4] == pytest.approx(uninterrupted[4], rel=0.01)
    assert resumed[6] == pytest.approx(uninterrupted[6], rel=0.01)
    assert (interrupted / "adapter_model" / "adapter_model.safetensors").is_file()
    assert final_train_loss(interrupted) == pytest.approx(final_train_loss(full), rel=1e-3)  # over all 6 steps
    # Each checkpoint holds the run record (train_args.json), listed in its marker; the final one adds the metrics.
    final = json.loads((full / "adapter_model" / "train_args.json").read_text())
    for step in (3, 6):
        record = json.loads((full / f"checkpoint-{step}" / "train_args.json").read_text())
        assert record == {key: value for key, value in final.items() if key not in ("metrics", "wall_seconds")}
        assert "train_args.json" in json.loads((full / f"checkpoint-{step}" / "checkpoint_complete.json").read_text())["files"]
    # Resumed onto another base, or with another LoRA shape: refused with both values, before the model loads.
    v2, v3 = trainable_models["chatglm2-6b"], trainable_models["chatglm3-6b"]
    for option, refused in ((f"--model_dir={v3}", f"was trained on chatglm2-6b ({v2}), this resume gives chatglm3-6b ({v3})"),
                            ("--lora_r=4", "was trained with 32, this resume gives 4")):
        result = run("train_deepspeed.py", f"--output_dir={interrupted}", "--resume_from_checkpoint=auto", *common, option,
                     check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"error: --{option[2:].split('=')[0]}: the run in {interrupted / 'checkpoint-6'} {refused}; start a new run" in result.stderr
        assert "trainable params" not in result.stdout


def test_deepspeed_launcher_runs_train_trainer_with_zero2_on_two_processes(trainable_models, sixteen_examples, overfit_runs, tmp_path):
    run_dir = tmp_path / "run"
    # Two ranks of batch 8: the global batch of 16 that train_deepspeed.py's run below has as 2 micro-batches of 8.
    batch_16 = [arg for arg in OVERFIT if not arg.startswith("--per_device_train_batch_size")]
    run_processes("train_trainer.py", "deepspeed", f"--model_dir={trainable_models['chatglm2-6b']}", f"--train_file={sixteen_examples}",
                  "--dev_file=none", f"--output_dir={run_dir}", "--max_steps=3", "--save_steps=3", *batch_16,
                  "--per_device_train_batch_size=8", WARMUP, LEARNING_RATE, "--logging_steps=1")
    # The Trainer ran the DeepSpeed engine with ZeRO-2 from deepspeed.json (its checkpoint is a DeepSpeed one).
    optim_states = run_dir / "checkpoint-3" / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    saved = torch.load(optim_states, map_location="cpu", weights_only=False)  # written by this test's run
    assert int(saved["optimizer_state_dict"]["zero_stage"]) == 2
    # The Trainer and train_deepspeed.py fill the "auto" entries alike (same lr, warmup, clipping, precision, ZeRO).
    trainer_ds, script_ds = saved["ds_config"], json.loads((overfit_runs("chatglm2-6b") / "adapter_model" / "train_args.json").read_text())["deepspeed_config"]
    for key in ("gradient_clipping", "optimizer", "bf16", "fp16", "zero_optimization"):
        assert trainer_ds[key] == script_ds[key], key
    # deepspeed.json names no scheduler: both use the Trainer's linear warmup and decay, not a DeepSpeed one.
    assert "scheduler" not in trainer_ds and "scheduler" not in script_ds
    adapter_dir = run_dir / "adapter_model"
    train_args = json.loads((adapter_dir / "train_args.json").read_text())
    assert train_args["script"] == "train_trainer.py" and train_args["config"]["local_rank"] == 0
    base, _ = load_model_and_tokenizer(trainable_models["chatglm2-6b"], dtype="fp32", device="cpu")
    PeftModel.from_pretrained(base, str(adapter_dir))
    # Both scripts normalise by the target tokens of the whole step: train_deepspeed.py's first loss, over two
    # accumulated micro-batches of 8 (before any update; LoRA B starts at 0), is the Trainer's over two ranks of 8.
    trainer_losses = logged_losses(run_dir, 3)
    assert logged_losses(overfit_runs("chatglm2-6b"), OVERFIT_STEPS["chatglm2-6b"])[1] == pytest.approx(trainer_losses[1], rel=1e-4)


def test_train_deepspeed_never_overwrites_a_finished_run(trainable_models, sixteen_examples, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "adapter_model").mkdir()
    args = [f"--model_dir={trainable_models['chatglm2-6b']}", f"--train_file={sixteen_examples}", f"--output_dir={run_dir}", "--max_steps=1"]
    result = run("train_deepspeed.py", *args, check=False, timeout=300)
    assert result.returncode != 0 and "already holds a run" in result.stderr
    assert (run_dir / "adapter_model").is_dir()
    # Resuming needs a checkpoint to resume from.
    result = run("train_deepspeed.py", *args, "--resume_from_checkpoint=auto", check=False, timeout=300)
    assert result.returncode == 1 and "no complete checkpoint-N folder" in result.stderr


# --- Several processes (gloo on CPU): ZeRO-2 / ZeRO-3 under the deepspeed launcher and under mpirun ---------------
MPIRUN = shutil.which("mpirun")
needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed (apt-get install openmpi-bin libopenmpi-dev)")


def run_processes(script, launcher, *args, processes=2, timeout=900):
    """The script on `processes` ranks: `deepspeed --num_gpus N` (gloo on CPU), `mpirun -np N python`, or torchrun."""
    if launcher == "torchrun":
        return run_script(script, *args, ranks=processes, timeout=timeout)
    if launcher == "mpirun":
        # --noprefix: Open MPI started by its full path puts its own bin folder (/usr/bin) first on the ranks' PATH,
        # where a different ninja than pip's hashes build commands differently, and every DeepSpeed process then rebuilt
        # its shm op (about 40 s each) as ranks and plain processes took turns.
        command = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "--noprefix", "-np", str(processes), sys.executable, script, *args]
    else:
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(processes), "--master_port",
                   str(free_port()), script, *args]
    # One intra-op thread per rank, as torchrun and the deepspeed launcher set it: mpirun leaves torch's default (all
    # cores) in every rank, and two ranks of two threads on two cores only wait on each other.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **FATAL_SIGNAL_TRACEBACKS}
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{' '.join(command[:8])} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="module")
def scale_out_data(sixteen_examples):
    return [f"--train_file={sixteen_examples}", f"--dev_file={sixteen_examples}", "--max_steps=4", "--logging_steps=1",
            "--eval_steps=1000", "--save_steps=1000", "--seed=7", "--learning_rate=1e-3", "--warmup_steps=1"]


@pytest.fixture(scope="module")
def one_process_reference(trainable_models, scale_out_data, tmp_path_factory):
    """script -> (train_loss, adapter) of 1 process with batch 4 x 2 accumulation steps: the global batch of 2 x 4."""
    done = {}

    def get(script):
        if script not in done:
            out = tmp_path_factory.mktemp("one") / "run"
            extra = ["--report_to=none"] if script == "train_trainer.py" else []
            run(script, f"--model_dir={trainable_models['chatglm2-6b']}", f"--output_dir={out}", *scale_out_data,
                "--per_device_train_batch_size=4", "--gradient_accumulation_steps=2", *extra)
            done[script] = out
        return done[script]

    return get


def adapter_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter_model" / "adapter_model.safetensors"))


@pytest.mark.parametrize("script,launcher,zero", [
    ("train_deepspeed.py", "deepspeed", 2),
    ("train_deepspeed.py", "torchrun", 3),
    pytest.param("train_deepspeed.py", "mpirun", 2, marks=needs_mpirun),
    ("train_trainer.py", "torchrun", 3),
    ("train_trainer.py", "torchrun", 2),
    pytest.param("train_trainer.py", "mpirun", 2, marks=needs_mpirun),
])
def test_two_processes_train_like_one_with_the_same_global_batch(script, launcher, zero, trainable_models, scale_out_data,
                                                                  one_process_reference, tmp_path):
    reference = one_process_reference(script)
    out = tmp_path / "run"
    extra = ["--report_to=none"] if script == "train_trainer.py" else []
    if zero == 3:  # partition even the small LoRA matrices, so that saving must gather them
        settings = json.loads((REPO_ROOT / "deepspeed_zero3.json").read_text())
        settings["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (tmp_path / "zero3.json").write_text(json.dumps(settings))
        extra.append(f"--deepspeed={tmp_path / 'zero3.json'}")
    # ZeRO-2: no --deepspeed, the default (deepspeed.json) under every launcher.
    result = run_processes("tests/threads_at_exit.py", launcher, script, f"--model_dir={trainable_models['chatglm2-6b']}",
                           f"--output_dir={out}", *scale_out_data, "--per_device_train_batch_size=4", *extra)
    # The run's process groups ended with it: no communication thread still runs while the interpreter shuts down,
    # where one that releases a Python object aborts the rank after a good run. (ZeRO-3 is left out: DeepSpeed's own
    # module-level state keeps its model, and with it the groups, to the end.)
    threads_at_exit = re.findall(r"threads at exit \(rank (\d)\): (.*)", result.stdout)
    assert sorted(rank for rank, _ in threads_at_exit) == ["0", "1"], result.stdout[-3000:]
    if zero == 2:
        assert not [names for _, names in threads_at_exit if "gloo" in names], threads_at_exit
    saved = json.loads((out / "adapter_model" / "train_args.json").read_text())
    expected = json.loads((reference / "adapter_model" / "train_args.json").read_text())
    assert saved["world_size"] == 2
    assert saved["deepspeed_config"]["zero_optimization"]["stage"] == zero
    assert saved["deepspeed_config"]["train_batch_size"] == 8 and saved["deepspeed_config"]["gradient_accumulation_steps"] == 1
    loss, reference_loss = saved["metrics"]["train_loss"], expected["metrics"]["train_loss"]
    assert abs(loss - reference_loss) <= 0.01 * abs(reference_loss), (loss, reference_loss)
    # One process logged and saved (rank 0 only): one final metrics block in the output, not two.
    assert (result.stdout + result.stderr).count('"train_loss"') == 1
    # The adapter is whole (ZeRO-3 partitions the LoRA weights: saving gathers them) and matches the one process.
    mine, theirs = adapter_weights(out), adapter_weights(reference)
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert mine[name].shape == tensor.shape, name
        torch.testing.assert_close(mine[name], tensor, atol=5e-3, rtol=0.05, msg=name)


def model_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def assert_same_weights(mine, theirs, model_dir):
    """Equal state dicts of two full fine-tuning runs, except ChatGLM2's key bias: its true gradient is 0 (it adds the
    same amount to every score of a query), so Adam turns rounding noise into +-lr steps that differ between runs."""
    config = json.loads((model_dir / "config.json").read_text())
    query_width, key_width = (config[n] * config["kv_channels"] for n in ("num_attention_heads", "multi_query_group_num"))
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        other = mine[name]
        if name.endswith("query_key_value.bias"):
            other, tensor = other.clone(), tensor.clone()
            other[query_width:query_width + key_width] = 0
            tensor[query_width:query_width + key_width] = 0
        torch.testing.assert_close(other, tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_full_fine_tuning_with_zero3_offload_on_two_processes_trains_resumes_and_saves_the_whole_model(
        trainable_models, sixteen_examples, scale_out_data, tmp_path):
    model_dir = trainable_models["chatglm2-6b"]
    common = [f"--model_dir={model_dir}", "--method=full", *scale_out_data, "--save_steps=2", "--per_device_train_batch_size=4"]
    # One process (deepspeed.json: ZeRO-2), batch 4 x 2 accumulation steps: the global batch of the two processes.
    one = tmp_path / "one"
    run("train_deepspeed.py", f"--output_dir={one}", *common, "--gradient_accumulation_steps=2")
    two = tmp_path / "two"
    offload = ["--deepspeed=deepspeed_zero3_offload.json"]
    run_processes("train_deepspeed.py", "torchrun", f"--output_dir={two}", *common, *offload)
    saved = assert_full_model_folder(two, model_dir, sixteen_examples, "train_deepspeed.py")
    zero = saved["deepspeed_config"]["zero_optimization"]
    assert saved["world_size"] == 2 and zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert saved["deepspeed_config"]["train_batch_size"] == 8
    reference = json.loads((one / "model" / "train_args.json").read_text())["metrics"]["train_loss"]
    assert abs(saved["metrics"]["train_loss"] - reference) <= 0.01 * abs(reference)
    # Gathered whole from the two shards and equal to the one process's weights.
    assert_same_weights(model_weights(two), model_weights(one), model_dir)
    # Interrupted after step 2: both ranks' shards of checkpoint-2 bring the run back to the same end.
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    shutil.rmtree(resumed / "model")
    assert len(list((resumed / "checkpoint-2" / "global_step2").glob("*optim_states.pt"))) == 2
    result = run_processes("train_deepspeed.py", "torchrun", f"--output_dir={resumed}", *common, *offload, "--resume_from_checkpoint=auto")
    assert f"resumed from {resumed / 'checkpoint-2'} (step 2 of 4)" in result.stdout
    uninterrupted, again = logged_losses(two, 4), logged_losses(resumed, 4)
    assert again[3] == pytest.approx(uninterrupted[3], rel=1e-4) and again[4] == pytest.approx(uninterrupted[4], rel=1e-4)
    assert_same_weights(model_weights(resumed), model_weights(two), model_dir)


def test_train_trainer_full_fine_tuning_with_zero3_on_two_processes_saves_the_whole_model(
        trainable_models, sixteen_examples, scale_out_data, tmp_path):
    out = tmp_path / "run"
    run_processes("train_trainer.py", "torchrun", f"--model_dir={trainable_models['chatglm2-6b']}", f"--output_dir={out}",
                  "--method=full", *scale_out_data, "--save_steps=0", "--per_device_train_batch_size=4",
                  "--deepspeed=deepspeed_zero3.json", "--report_to=none")
    saved = assert_full_model_folder(out, trainable_models["chatglm2-6b"], sixteen_examples, "train_trainer.py")
    assert saved["world_size"] == 2 and saved["deepspeed_config"]["zero_optimization"]["stage"] == 3
    assert not list(out.glob("checkpoint-*"))  # --save_steps=0: no checkpoints, the final model all the same



def test_zero3_ranks_with_unequal_answer_lengths_train(trainable_models, tmp_path):
    """ZeRO-3 gathers the output layer's weight at every call: the chunked loss must call it as often on every rank,
    also when one rank's answer needs more chunks (1,024 target tokens each) than the other's. Before the ranks agreed
    on the count, gloo stopped with a collective mismatch here (NCCL would hang)."""
    long_answer = "，".join(f"人名{i}" for i in range(700))  # ~2,100 tokens: three chunks against the other's one
    rows = [{"instruct": "找出人名", "query": "张三去了上海。", "answer": long_answer},
            {"instruct": "找出人名", "query": "李四在北京。", "answer": "李四"}]
    train = tmp_path / "train.txt"
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "run"
    run_processes("train_trainer.py", "torchrun", f"--model_dir={trainable_models['chatglm2-6b']}",
                  f"--train_file={train}", "--dev_file=none", f"--output_dir={out}", "--max_steps=2", "--save_steps=0",
                  "--per_device_train_batch_size=1", "--max_source_length=64", "--max_target_length=4000",
                  "--deepspeed=deepspeed_zero3.json", "--report_to=none")
    record = json.loads((out / "adapter_model" / "train_args.json").read_text())
    # Both steps trained the long answer whole (over 2,048 tokens a step, both samples together ~4,000).
    assert record["world_size"] == 2 and record["metrics"]["num_input_tokens_seen"] > 2 * 2 * 1024
