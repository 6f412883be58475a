"""Several processes on the CPU (gloo): 02_train_dft.py under torchrun equals one process with the same global
batch, --resume works across processes, FSDP (1 and 2) and DeepSpeed ZeRO-2/3 around DFTObjective give the
one-process gradients, and --grad-checkpointing / --dtype bfloat16 / mixed precision bf16 train as they should.

Which one-process runs equal 2 processes x batch 2 x accumulation 1? micro_batch_order gives every split of a
global batch of 4 the same examples per optimizer step, and every term is normalised by the step's global count
(labelled tokens or pairs, all devices and micro-batches): so 1 process x batch 4 and 1 process x batch 2 x
accumulation 2 both, for every method, in weights and in the logged losses.

This file is also the worker of the 2-process runs: `torchrun ... tests/test_distributed.py --ddp-worker OUT MODEL`
(every DDP training compared below, in one launch), `--fsdp-worker OUT` and `--zero-worker OUT`.
"""
import functools
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import REPO, gloo_threads, load_stage, make_tiny_model, make_tokenizer  # noqa: E402

import common  # noqa: E402

train = load_stage("02_train_dft")
PAIRS = os.path.join(REPO, "tests", "fixtures", "pairs_zh.jsonl")
SCRIPT = os.path.join(REPO, "02_train_dft.py")
# the mixed objective covers both kinds of terms: LC feature (states captured from the TFT pass, English pass
# truncated under no_grad) and ET logits (truncated pass, frozen lens readout)
# float32 (--mixed-precision no): the equalities below are exact up to float32 reduction order
BASE_FLAGS = ["--pairs", PAIRS, "--lc-layer", "1", "--et-layer", "3", "--max-steps", "4", "--lr", "3e-3",
              "--warmup-ratio", "0.25", "--mixed-precision", "no"]
MIXED = ["--method", "dft-logits", "--lc", "feature", "--et", "logits"]
FLAGS = [*BASE_FLAGS, *MIXED, "--batch-size", "2"]
SPLIT_METHODS = {"sft": ["--method", "sft"], "tft": ["--method", "tft"],
                 "dft-logits": ["--method", "dft-logits", "--lens-prefix", "recompute"],
                 "dft-logits-shared": ["--method", "dft-logits", "--lens-prefix", "shared"],
                 "dft-feature": ["--method", "dft-feature"], "mixed": MIXED}
LOGGED = ("loss", "loss_tft", "loss_lc", "loss_et", "grad_norm", "lr")


pytestmark = pytest.mark.usefixtures("one_thread")


def launch(nproc, *args, script=SCRIPT, timeout=300, env=None):
    """`python -m torch.distributed.run` (torchrun) with nproc CPU processes; no GPU, no accelerate config."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    for key in ("ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION"):  # the script must need neither
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]


def same_logs(a, b, rel=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["tokens"] == rb["tokens"], ra["step"]
        for k in LOGGED:
            if rb[k] is None:  # a term the method does not have
                assert ra[k] is None, (ra["step"], k)
                continue
            assert ra[k] == pytest.approx(rb[k], rel=rel, abs=1e-7), (ra["step"], k, ra[k], rb[k])


def same_weights(a, b, atol=1e-5):
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_model_dirs):
    out = str(tmp_path_factory.mktemp("ddp") / "run")
    result = ok(launch(2, *FLAGS, "--model", tiny_model_dirs["llama"], "--out", out, "--global-batch-size", "4"))
    return out, result


def test_two_processes_equal_one_process(two_process_run, tiny_model_dirs, tmp_path):
    out2, result = two_process_run
    cfg = json.load(open(os.path.join(out2, "train_config.json")))
    assert (cfg["world_size"], cfg["grad_accum"], cfg["global_batch"]) == (2, 1, 4)
    assert cfg["distributed_type"] == "MULTI_CPU" and cfg["mixed_precision"] == "no"
    assert "global batch 4 = 2 per device x 2 devices x 1 accumulation" in result.stdout
    assert result.stdout.count("saved dft-logits model") == 1  # only the main process logs and saves
    assert "Setting accelerator to CPU" not in result.stdout + result.stderr  # no DeepSpeed probe on a plain run
    out1 = str(tmp_path / "one")
    train.main([*FLAGS, "--model", tiny_model_dirs["llama"], "--out", out1, "--global-batch-size", "4"])
    assert json.load(open(os.path.join(out1, "train_config.json")))["grad_accum"] == 2
    log2, log1 = read_log(out2), read_log(out1)
    assert len(log2) == 4
    same_logs(log2, log1)
    same_weights(out2, out1)


# every 2-process training the equivalence tests below compare with one process: one launch runs them all
DDP_RUNS = {**{f"split-{method}": [*BASE_FLAGS, *flags, "--batch-size", "2"] for method, flags in SPLIT_METHODS.items()},
            "mid-align-global": [*BASE_FLAGS, "--method", "mid-align", "--batch-size", "2", "--contrastive-negatives", "global"],
            "mid-align-alternate": [*BASE_FLAGS, "--method", "mid-align", "--alternate", "--batch-size", "2"]}


def _ddp_worker(out_dir, model_dir):
    """Each rank: the DDP_RUNS trainings one after another in one process group (one process start, not seven)."""
    import gc
    from accelerate import Accelerator
    from torch.nn.parallel import DistributedDataParallel
    held = []  # per training: its DDP models still alive when it ends its run (no collection here: 02 collects)

    def end_training(self):  # keeps the process group the next training needs
        held.append(sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()))
    Accelerator.end_training = end_training
    for name, flags in DDP_RUNS.items():
        print(f"[ddp-worker] {name}", flush=True)  # the failing run's name ends up in the launch's output
        train.main([*flags, "--model", model_dir, "--out", os.path.join(out_dir, name)])
    torch.distributed.destroy_process_group()
    # test_trainings_end_with_their_process_group_freed
    common.write_json(os.path.join(out_dir, f"group_holders_rank{os.environ['RANK']}.json"),
                      dict(gloo_threads_left=gloo_threads(), ddp_models_at_end_training=held))


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, tiny_model_dirs):
    out = str(tmp_path_factory.mktemp("ddp-runs"))
    ok(launch(2, "--ddp-worker", out, tiny_model_dirs["llama"], script=os.path.abspath(__file__), timeout=600))
    return {name: os.path.join(out, name) for name in DDP_RUNS}


def test_trainings_end_with_their_process_group_freed(ddp_runs):
    """destroy_process_group frees the group and joins gloo's threads: 02 imports the modules that would hold it
    before creating it (common.before_process_group), and frees its DDP model before ending the run. Threads alive
    as Python shuts down can abort a process after every file is written, as they did in 03 (docs/LOG.md, session
    20); a DDP reducer that outlives the group destroys it with the GIL held, which hung 02 (session 21)."""
    out = os.path.dirname(next(iter(ddp_runs.values())))
    if gloo_threads() is None:
        pytest.skip("reads thread names from Linux's /proc")
    for rank in (0, 1):
        holders = common.read_json(os.path.join(out, f"group_holders_rank{rank}.json"))
        assert holders == dict(gloo_threads_left=[], ddp_models_at_end_training=[0] * len(DDP_RUNS)), rank


@pytest.mark.parametrize("method", SPLIT_METHODS)
def test_loss_independent_of_batch_split(method, ddp_runs, tiny_model_dirs, tmp_path):
    """The same global batch of 4 split three ways: 1 process x 4, 1 process x 2 x accumulation 2, 2 processes x 2.
    Sequences of different lengths weigh the same in every split (step-global normalisation)."""
    flags = [*BASE_FLAGS, *SPLIT_METHODS[method], "--model", tiny_model_dirs["llama"]]
    runs = {name: str(tmp_path / name) for name in ("b4", "b2x2")}
    train.main([*flags, "--out", runs["b4"], "--batch-size", "4"])
    train.main([*flags, "--out", runs["b2x2"], "--batch-size", "2", "--grad-accum", "2"])
    runs["ddp"] = ddp_runs[f"split-{method}"]
    assert json.load(open(os.path.join(runs["ddp"], "train_config.json")))["world_size"] == 2
    logs = {name: read_log(out) for name, out in runs.items()}
    assert len(set(r["tokens"] for r in logs["b4"])) > 1  # the steps differ in length: the case that used to differ
    for name in ("b2x2", "ddp"):
        same_logs(logs[name], logs["b4"])
        same_weights(runs[name], runs["b4"])


def test_shared_lens_prefix_under_ddp_equals_recompute(ddp_runs):
    """--lens-prefix shared on 2 processes: the lens passes attend to the prompt's keys and values from the L_TFT
    pass on every step (none recomputed), and train like the recomputing run of the same launch."""
    shared, recompute = ddp_runs["split-dft-logits-shared"], ddp_runs["split-dft-logits"]
    log = read_log(shared)
    assert json.load(open(os.path.join(shared, "train_config.json")))["lens_prefix"] == "shared"
    assert [r["lens_recomputed"] for r in log] == [0] * 4
    same_logs(log, read_log(recompute))
    same_weights(shared, recompute)


def test_two_process_resume(two_process_run, tiny_model_dirs, tmp_path):
    out_full, _ = two_process_run
    out = str(tmp_path / "cut")
    base = [*FLAGS, "--model", tiny_model_dirs["llama"], "--out", out, "--save-every", "2"]
    ok(launch(2, *base, "--stop-after-steps", "3"))  # interrupted after step 3; the checkpoint holds step 2
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    assert sorted(f for f in os.listdir(os.path.join(out, "checkpoint")) if f.startswith("random_states")) == \
        ["random_states_0.pkl", "random_states_1.pkl"]
    ok(launch(2, *base, "--resume"))
    same_logs(read_log(out), read_log(out_full))
    same_weights(out, out_full)


def test_launch_errors_end_every_process(tiny_model_dirs, tmp_path):
    r = launch(2, *FLAGS, "--model", tiny_model_dirs["llama"], "--out", str(tmp_path / "e"), "--global-batch-size", "6",
               timeout=120)
    assert r.returncode != 0 and "error: --global-batch-size 6 is not a multiple of --batch-size 2 x 2 devices" in r.stderr


def test_global_contrastive_negatives_equal_one_process(ddp_runs, tiny_model_dirs, tmp_path):
    """mid-align with negatives gathered from both devices (gradient through the gather) == one process, batch 4."""
    one, two = str(tmp_path / "one"), ddp_runs["mid-align-global"]
    train.main([*BASE_FLAGS, "--method", "mid-align", "--model", tiny_model_dirs["llama"], "--out", one, "--batch-size", "4"])
    assert json.load(open(os.path.join(two, "train_config.json")))["world_size"] == 2
    same_logs(read_log(two), read_log(one))
    same_weights(two, one)


def test_alternate_under_ddp(ddp_runs, tiny_model_dirs, tmp_path):
    """--alternate: the alignment steps leave the upper blocks and lm_head without gradient; DDP must accept that
    (find_unused_parameters) and train like one process."""
    one, two = str(tmp_path / "one"), ddp_runs["mid-align-alternate"]
    train.main([*BASE_FLAGS, "--method", "mid-align", "--alternate", "--model", tiny_model_dirs["llama"], "--out", one,
                "--batch-size", "4"])
    assert json.load(open(os.path.join(two, "train_config.json")))["world_size"] == 2
    assert [r["phase"] for r in read_log(two)] == ["task", "align", "task", "align"]
    same_logs(read_log(two), read_log(one))
    same_weights(two, one)


# -----------------------------------------------------------------------------
# FSDP around DFTObjective, as accelerate wraps it: decoder blocks auto-wrapped, the objective is the root unit
# (it holds embeddings, final norm and lm_head, so they are unsharded for the whole loss forward)

# NAME-shared: NAME with --lens-prefix shared on both lens terms (SHARED), compared with the recomputing reference of
# the same terms; under the checkpoint wrapper it falls back (its recompute would update the lens caches twice)
# NAME-tuned: NAME with the shared lens terms read through a tuned lens (--readout tuned: translators as buffers)
FSDP_VARIANTS = ("fsdp2", "fsdp2-grad-ckpt", "fsdp2-ac-wrapper", "fsdp1",
                 "fsdp2-shared", "fsdp2-ac-wrapper-shared", "fsdp1-shared", "fsdp2-tuned", "fsdp1-tuned")
# ce_chunk 4 and uneven ranks (1 pair vs 3 pairs; rank 0 has no labelled LC token): the ranks run different
# numbers of CE chunks unless chunk_count evens them out, which ZeRO-3's per-call gathers need
FSDP_CFG = dict(method="dft-logits", lc="logits", et="feature", lc_layer_used=1, et_layer_used=3, ce_chunk=4,
                lens_prefix="recompute")
SHARED = dict(et="logits", lens_prefix="shared")
FLAVOURS = {False: {}, True: SHARED, "tuned": dict(SHARED, readout="tuned")}


def fsdp_config(shared=False):
    """shared: False (FSDP_CFG), True (SHARED) or "tuned" (SHARED through a tuned lens)."""
    cfg = dict(train.DEFAULTS)
    cfg.update(train.METHODS["dft-logits"])
    cfg.update(FSDP_CFG)
    cfg.update(FLAVOURS[shared])
    return cfg


def tuned_lens():
    """A tuned lens for the tiny LLaMA with random translators (the one-process reference reads the same)."""
    generator = torch.Generator().manual_seed(0)
    translators = {k: (0.1 * torch.randn(32, 32, generator=generator), 0.1 * torch.randn(32, generator=generator))
                   for k in range(4)}
    return common.TunedLens(None, translators, {}, None, None, True)


def objective_for(model, shared):
    return train.DFTObjective(model, fsdp_config(shared), tuned_lens() if shared == "tuned" else None)


def flavour_of(variant):
    return "tuned" if variant.endswith("-tuned") else variant.endswith("-shared")


def fsdp_batch(tokenizer, rank, shared=False):
    rows = train.load_pairs(PAIRS)[:1] if rank == 0 else train.load_pairs(PAIRS)[1:4]
    examples, _ = train.encode_pairs(tokenizer, rows, fsdp_config(shared))
    batch = train.collate(examples, tokenizer.pad_token_id)
    if rank == 0:  # as if max-length had cut every x_en token of its LC sequence
        batch["lc"]["labels"].fill_(-100)
    return batch


def global_denominators(tokenizer, world=1, shared=False):
    """The step's counts over both ranks' batches, divided by the number of devices that average the gradients."""
    counts = [train.term_counts(fsdp_batch(tokenizer, rank, shared)) for rank in (0, 1)]
    return {k: (counts[0][k] + counts[1][k]) / world for k in counts[0]}


def _fsdp_worker(out_path):
    """Each rank: two pairs, one forward + backward of the wrapped objective; rank 0 saves the full gradients."""
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, fully_shard
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = make_tokenizer()
    results, recomputed = {}, {}
    for variant in FSDP_VARIANTS:
        wrapping = variant.removesuffix("-shared").removesuffix("-tuned")
        model = make_tiny_model("llama", tokenizer).train()
        if wrapping == "fsdp2-grad-ckpt":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        shared = flavour_of(variant)
        objective = objective_for(model, shared)
        if wrapping == "fsdp1":
            policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
            objective = FSDP(objective, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
        else:
            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
            for i, layer in enumerate(model.model.layers):
                if wrapping == "fsdp2-ac-wrapper":  # accelerate's fsdp_activation_checkpointing: wrapper, then shard
                    layer = model.model.layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
                fully_shard(layer, mesh=mesh)
            fully_shard(objective, mesh=mesh)
        terms = objective(fsdp_batch(tokenizer, rank, shared), global_denominators(tokenizer, world=2, shared=shared))
        terms["loss"].backward()
        recomputed[variant] = float(terms["lens_recomputed"])
        if wrapping == "fsdp1":
            with FSDP.summon_full_params(objective, with_grads=True):
                grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
        else:
            grads = {n: p.grad.full_tensor() for n, p in objective.named_parameters() if p.grad is not None}
        clean = lambda n: n.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
        results[variant] = {clean(n): g for n, g in grads.items()}
    if rank == 0:
        torch.save(dict(results, recomputed=recomputed), out_path)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_grads(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fsdp") / "grads.pt")
    ok(launch(2, "--fsdp-worker", out, script=os.path.abspath(__file__)))
    return torch.load(out)


@pytest.fixture(scope="module")
def reference_grads():
    """One process, no wrapper, no chunking, recomputed lens prefix: both ranks' pairs normalised by the step's
    global counts; {False: the FSDP_CFG terms, True: those of the shared variants (SHARED), "tuned": SHARED read
    through the tuned lens}."""
    tokenizer = make_tokenizer()
    assert train.term_counts(fsdp_batch(tokenizer, 0))["lc"] == 0 < train.term_counts(fsdp_batch(tokenizer, 1))["lc"]
    grads = {}
    for shared in FLAVOURS:
        model = make_tiny_model("llama", tokenizer).train()
        objective = train.DFTObjective(model, dict(fsdp_config(shared), ce_chunk=0, lens_prefix="recompute"),
                                       tuned_lens() if shared == "tuned" else None)
        for rank in (0, 1):  # the gradients of the two batches add up
            batch = fsdp_batch(tokenizer, rank, shared)
            objective(batch, global_denominators(tokenizer, shared=shared))["loss"].backward()
        grads[shared] = {n: p.grad for n, p in objective.named_parameters() if p.grad is not None}
    return grads


@pytest.mark.parametrize("variant", FSDP_VARIANTS)
def test_fsdp_objective_gradients_equal_one_process(variant, fsdp_grads, reference_grads):
    grads, reference = fsdp_grads[variant], reference_grads[flavour_of(variant)]
    # the shared prefix ran wherever it is exact (not through the checkpoint wrapper)
    assert fsdp_grads["recomputed"][variant] == float(variant == "fsdp2-ac-wrapper-shared")
    assert set(grads) == set(reference)
    for name, ref in reference.items():
        torch.testing.assert_close(grads[name], ref, atol=1e-6, rtol=1e-4, msg=name)


def _zero_worker(out_path):
    """Each rank: two pairs through DeepSpeed ZeRO-2 and ZeRO-3 (CPU accelerator, gloo); rank 0 saves the full
    gradients of each stage."""
    import gc

    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad
    # plain gloo: DeepSpeed's CPU accelerator would JIT-compile a shared-memory all-reduce (a C++ build of
    # ~35 s on a clean machine, which once aborted one rank at exit), which ZeRO's gradients do not need.
    # The module by name: the attribute deepspeed.comm.torch is PyTorch itself (deepspeed.comm re-exports it)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    common.before_process_group(deepspeed=True)  # as 02: the group is freed at the end, not as Python shuts down
    deepspeed.init_distributed(dist_backend="gloo")
    tokenizer = make_tokenizer()
    results = {}
    for stage, shared in ((2, False), (3, False), (2, True), (3, True), (3, "tuned")):
        objective = objective_for(make_tiny_model("llama", tokenizer).train(), shared)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
                  "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=objective, config=config,
                                          optimizer=torch.optim.AdamW(objective.parameters(), lr=0.0))
        # ZeRO-3 partitions every weight, lm_head and the final norm included: the case the readout must handle
        assert all(hasattr(p, "ds_id") for p in engine.module.parameters()) == (stage == 3)
        terms = engine(fsdp_batch(tokenizer, dist.get_rank(), shared), global_denominators(tokenizer, 2, shared))
        engine.backward(terms["loss"])
        results[stage, shared] = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        results[stage, shared, "recomputed"] = float(terms["lens_recomputed"])
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    del engine, objective, terms
    gc.collect()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def zero_grads(tmp_path_factory):
    pytest.importorskip("deepspeed", reason="optional: pip install deepspeed (CPU accelerator, no GPU needed)")
    out = str(tmp_path_factory.mktemp("zero") / "grads.pt")
    ok(launch(2, "--zero-worker", out, script=os.path.abspath(__file__), env={"DS_ACCELERATOR": "cpu"}))
    return torch.load(out)


@pytest.mark.parametrize("stage, shared", [(2, False), (3, False), (2, True), (3, True), (3, "tuned")])
def test_deepspeed_objective_gradients_equal_one_process(stage, shared, zero_grads, reference_grads):
    grads, reference = zero_grads[stage, shared], reference_grads[shared]
    assert zero_grads[stage, shared, "recomputed"] == 0  # shared: the prefix was shared, not recomputed
    assert set(grads) == set(reference)
    for name, ref in reference.items():
        torch.testing.assert_close(grads[name].reshape(ref.shape), ref, atol=1e-6, rtol=1e-4, msg=name)


# -----------------------------------------------------------------------------
# the shipped accelerate configs, read by accelerate's own launcher code (no GPU needed)

def launch_env(name):
    """(launcher args, environment) that `accelerate launch --config_file configs/NAME.yaml` gives its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
    args = launch_command_parser().parse_args(["--config_file", os.path.join(REPO, "configs", name + ".yaml"), SCRIPT])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(
            [*defaults.deepspeed_config, *(["mixed_precision"] if mp_from_config else [])])
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def fake_accelerator(env, monkeypatch, num_processes):
    """What check_distributed / configure_deepspeed read from an Accelerator, built from a launch environment."""
    from types import SimpleNamespace
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    fsdp = FullyShardedDataParallelPlugin() if env.get("ACCELERATE_USE_FSDP") == "true" else None
    ds = DeepSpeedPlugin() if env.get("ACCELERATE_USE_DEEPSPEED") == "true" else None
    kind = DistributedType.FSDP if fsdp else DistributedType.DEEPSPEED if ds else DistributedType.MULTI_GPU
    return SimpleNamespace(distributed_type=kind, is_fsdp2=bool(fsdp and fsdp.fsdp_version == 2), num_processes=num_processes,
                           state=SimpleNamespace(fsdp_plugin=fsdp, deepspeed_plugin=ds))


def method_config(method, *flags):
    return train.resolve_config(train.parse_args(["--pairs", PAIRS, "--out", "o", "--preset", "llama2-7b", "--method", method,
                                                  *flags]))


ALL_METHODS = ("sft", "tft", "dft-logits", "dft-feature")


@pytest.mark.parametrize("name, kind, processes, refused", [
    ("fsdp_8gpu", "FSDP", 8, ()),
    ("fsdp_2node", "FSDP", 16, ()),
    ("ddp_8gpu", "MULTI_GPU", 8, ()),
    ("deepspeed_zero2", "DEEPSPEED", 8, ()),
    ("deepspeed_zero3", "DEEPSPEED", 8, ()),
])
def test_shipped_configs(name, kind, processes, refused, monkeypatch):
    args, env = launch_env(name)
    assert args.num_processes == processes and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    accelerator = fake_accelerator(env, monkeypatch, processes)
    assert accelerator.distributed_type.value == kind
    if kind == "FSDP":
        plugin = accelerator.state.fsdp_plugin
        assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
        assert plugin.reshard_after_forward is True and not plugin.activation_checkpointing
    for method in ALL_METHODS:
        if method in refused:
            with pytest.raises(common.UserError, match="ZeRO-3"):
                train.check_distributed(accelerator, method_config(method))
        else:
            train.check_distributed(accelerator, method_config(method))


def test_fsdp1_needs_orig_params(monkeypatch):
    _, env = launch_env("fsdp_8gpu")
    accelerator = fake_accelerator(dict(env, FSDP_VERSION="1", FSDP_SYNC_MODULE_STATES="false"), monkeypatch, 8)
    for method in ALL_METHODS:  # the lens terms are exact under FSDP1 too (test_fsdp_objective_gradients...)
        train.check_distributed(accelerator, method_config(method))
    accelerator = fake_accelerator(dict(env, FSDP_VERSION="1", FSDP_USE_ORIG_PARAMS="false", FSDP_SYNC_MODULE_STATES="false"),
                                   monkeypatch, 8)
    with pytest.raises(common.UserError, match="fsdp_use_orig_params: true"):
        train.check_distributed(accelerator, method_config("tft"))


def test_deepspeed_takes_the_loop_settings(monkeypatch):
    _, env = launch_env("deepspeed_zero3")
    accelerator = fake_accelerator(env, monkeypatch, 8)
    with pytest.raises(common.UserError, match="pass the block numbers"):
        train.check_distributed(accelerator, method_config("dft-logits", "--lc", "feature", "--et", "none",
                                                           "--lc-layer", "auto"))
    cfg = method_config("tft", "--batch-size", "2", "--max-grad-norm", "0.5")
    train.configure_deepspeed(accelerator, cfg)
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"]) == (2, 1, 16, 0.5)
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # a full final model


# -----------------------------------------------------------------------------
# memory and precision flags (one process)

STEPS2 = ["--pairs", PAIRS, "--method", "dft-logits", "--lc-layer", "1", "--et-layer", "3", "--max-steps", "2",
          "--lr", "3e-3", "--warmup-ratio", "0", "--batch-size", "4"]


@pytest.mark.parametrize("method", ["dft-logits", "dft-feature"])
def test_grad_checkpointing_changes_nothing(method, tiny_model_dirs, tmp_path):
    """The truncated passes stop in a hook after block k: with checkpointed blocks the losses and the updates
    (2 steps) are those of the plain run."""
    # recompute on both sides: under checkpointing --lens-prefix shared recomputes (its equality is tested above)
    flags = [*STEPS2, "--method", method, "--model", tiny_model_dirs["llama"], "--lens-prefix", "recompute"]
    plain, ckpt = str(tmp_path / "plain"), str(tmp_path / "ckpt")
    train.main([*flags, "--out", plain])
    train.main([*flags, "--out", ckpt, "--grad-checkpointing"])
    same_logs(read_log(ckpt), read_log(plain), rel=1e-6)
    same_weights(ckpt, plain, atol=1e-6)


def test_bfloat16_weights_train_and_warn(tiny_model_dirs, tmp_path, capsys):
    out = str(tmp_path / "bf16")
    train.main([*STEPS2, "--model", tiny_model_dirs["llama"], "--out", out, "--dtype", "bfloat16", "--grad-checkpointing",
                "--mixed-precision", "no"])
    log = read_log(out)
    assert len(log) == 2 and all(r["loss"] == r["loss"] and r["loss"] < 100 for r in log)
    assert all(w.dtype == torch.bfloat16 for w in load_file(os.path.join(out, "model.safetensors")).values())
    assert "without fp32 master weights" in capsys.readouterr().out


def test_mixed_precision_bf16_keeps_fp32_master_weights(tiny_model_dirs, tmp_path):
    """A launch config with mixed_precision: bf16 (here its environment variable): bf16 compute, and weights loaded
    in bfloat16 are trained (and saved) in float32, as FSDP and DeepSpeed do by themselves."""
    out = str(tmp_path / "amp")
    env = dict(os.environ, ACCELERATE_MIXED_PRECISION="bf16", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, SCRIPT, *STEPS2, "--model", tiny_model_dirs["llama"], "--out", out,
                        "--dtype", "bfloat16"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mixed precision bf16" in r.stdout and "without fp32 master weights" not in r.stdout
    assert json.load(open(os.path.join(out, "train_config.json")))["mixed_precision"] == "bf16"
    assert all(w.dtype == torch.float32 for w in load_file(os.path.join(out, "model.safetensors")).values())
    assert len(read_log(out)) == 2


if __name__ == "__main__" and sys.argv[1:2] == ["--ddp-worker"]:
    _ddp_worker(sys.argv[2], sys.argv[3])
if __name__ == "__main__" and sys.argv[1:2] == ["--fsdp-worker"]:
    _fsdp_worker(sys.argv[2])
if __name__ == "__main__" and sys.argv[1:2] == ["--zero-worker"]:
    _zero_worker(sys.argv[2])
