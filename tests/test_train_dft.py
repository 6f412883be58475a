"""02_train_dft.py: each loss term against a reference, gradient routing, the loop, resume, layer rule, errors."""
import json
import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file

import common
from conftest import REPO, load_stage, make_tiny_model, run_main_in_process, run_stage

train = load_stage("02_train_dft")
PAIRS = os.path.join(REPO, "tests", "fixtures", "pairs_zh.jsonl")


def config(method="tft", **over):
    cfg = dict(train.DEFAULTS)
    cfg.update(train.METHODS[method], method=method, lc_layer_used=1, et_layer_used=3)
    cfg.update(over)
    return cfg


def batch_for(tokenizer, cfg, rows):
    examples, _ = train.encode_pairs(tokenizer, rows, cfg)
    return train.collate(examples, tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def rows():
    return train.load_pairs(PAIRS)[:4]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_tft_loss_equals_hf_loss(arch, tokenizer, rows):
    model = make_tiny_model(arch, tokenizer)
    cfg = config("tft", ce_chunk=7)  # chunking must not change the value
    batch = batch_for(tokenizer, cfg, rows)
    terms = train.DFTObjective(model, cfg)(batch)
    tft = batch["tft"]
    hf = model(input_ids=tft["input_ids"], attention_mask=tft["attention_mask"], labels=tft["labels"]).loss
    torch.testing.assert_close(terms["loss_tft"], hf)
    assert int(terms["tokens"]) == int((tft["labels"][:, 1:] != -100).sum())


def test_sft_trains_on_english_side(tokenizer, rows):
    cfg = config("sft")
    batch = batch_for(tokenizer, cfg, rows[:1])
    text = tokenizer.decode(batch["tft"]["input_ids"][0])
    assert rows[0]["y_en"] in text and rows[0]["x_en"] in text and rows[0]["y_tgt"] not in text


def test_sequence_layouts(tokenizer, rows):
    cfg = config("dft-logits")
    seqs = train.encode_pair(tokenizer, rows[0], cfg)
    dec = lambda s: tokenizer.decode([t for t, l in zip(s["input_ids"], s["labels"]) if l != -100])
    assert dec(seqs["tft"]) == rows[0]["y_tgt"] + tokenizer.eos_token
    assert dec(seqs["lc"]) == rows[0]["x_en"]  # [P(x_tgt); x_en], CE on x_en
    assert dec(seqs["et"]) == rows[0]["y_en"] + tokenizer.eos_token  # [P(x_tgt); y_en]
    first_label = next(n for n, l in enumerate(seqs["lc"]["labels"]) if l != -100)
    prompt = tokenizer.decode(seqs["lc"]["input_ids"][:first_label])
    assert prompt == common.build_prompt(rows[0]["x_tgt"])


def test_pool_mask_covers_x_only(tokenizer, rows):
    ids, mask = common.encode_prompt(tokenizer, rows[0]["x_tgt"])
    pooled = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert pooled.strip() == rows[0]["x_tgt"]  # no template token is pooled
    assert sum(mask) < len(ids)


def random_lens(model, scale=0.1, seed=0):
    """A TunedLens in memory with random translators at every hidden-state index (no folder)."""
    parts = common.model_parts(model)
    d, generator = parts.lm_head.weight.shape[1], torch.Generator().manual_seed(seed)
    translators = {k: (scale * torch.randn(d, d, generator=generator), scale * torch.randn(d, generator=generator))
                   for k in range(parts.num_layers)}
    return common.TunedLens(None, translators, {}, None, None, True)


@pytest.mark.parametrize("readout", ["logit", "tuned"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lens_terms_route_gradient_only_to_blocks_up_to_their_layer(arch, readout, tokenizer, rows):
    model = make_tiny_model(arch, tokenizer)
    parts = common.model_parts(model)
    lens = random_lens(model) if readout == "tuned" else None
    for name, layer in (("lc", 1), ("et", 3)):
        model.zero_grad(set_to_none=True)
        cfg = config("dft-logits", lc="logits" if name == "lc" else "none", et="logits" if name == "et" else "none",
                     tft_weight=0.0, lc_layer_used=1, et_layer_used=3, readout=readout)
        objective = train.DFTObjective(model, cfg, lens)
        terms = objective(batch_for(tokenizer, cfg, rows))
        # the translators are frozen buffers, outside every state dict: never trained, saved or sharded
        assert not any(b.requires_grad for b in objective.buffers())
        assert not [k for k in objective.state_dict() if k.startswith("readout.")]
        terms[f"loss_{name}"].backward()
        for k, block in enumerate(parts.blocks, 1):
            has_grad = any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
            assert has_grad == (k <= layer), (name, k)
        assert all(p.grad is None for p in parts.final_norm.parameters())
        head_grad = parts.lm_head.weight.grad
        if parts.tied:  # only the rows of input tokens (the lookup) may move, never the readout rows
            used = torch.zeros(len(tokenizer), dtype=torch.bool)
            used[batch_for(tokenizer, cfg, rows)[name]["input_ids"].unique()] = True
            assert head_grad[~used].abs().max() == 0
        else:
            assert head_grad is None


def test_lens_loss_equals_brute_force(tokenizer, rows):
    """L_LC logits == CE of lm_head(norm(hidden_states[i])) over the x_en tokens, computed the naive way."""
    model = make_tiny_model("llama", tokenizer)
    cfg = config("dft-logits", ce_chunk=5)
    batch = batch_for(tokenizer, cfg, rows)
    terms = train.DFTObjective(model, cfg)(batch)
    for name, layer in (("lc", 1), ("et", 3)):
        seq = batch[name]
        hs = model(input_ids=seq["input_ids"], attention_mask=seq["attention_mask"],
                   output_hidden_states=True).hidden_states
        logits = model.lm_head(model.model.norm(hs[layer]))
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), seq["labels"][:, 1:].flatten(),
                                                ignore_index=-100)
        torch.testing.assert_close(terms[f"loss_{name}"], ref)


def test_tuned_readout_equals_the_package_formula(tokenizer, rows):
    """--readout tuned: L_LC / L_ET == CE of lm_head(norm(h + A h + b)) (tuned_lens TunedLens.forward: unembed(h +
    translator(h))), the naive way."""
    model = make_tiny_model("llama", tokenizer)
    lens = random_lens(model)
    cfg = config("dft-logits-tuned", ce_chunk=5)
    batch = batch_for(tokenizer, cfg, rows)
    terms = train.DFTObjective(model, cfg, lens)(batch)
    for name, layer in (("lc", 1), ("et", 3)):
        seq = batch[name]
        h = model(input_ids=seq["input_ids"], attention_mask=seq["attention_mask"],
                  output_hidden_states=True).hidden_states[layer]
        translator = torch.nn.Linear(32, 32)
        translator.weight.data, translator.bias.data = lens.translator(layer)
        logits = model.lm_head(model.model.norm(h + translator(h)))
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), seq["labels"][:, 1:].flatten(),
                                                ignore_index=-100)
        torch.testing.assert_close(terms[f"loss_{name}"], ref)


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_zero_tuned_lens_is_the_logit_lens_bit_for_bit(arch, tokenizer, rows):
    model = make_tiny_model(arch, tokenizer)
    zero = random_lens(model, scale=0.0)
    cfg = config("dft-logits", ce_chunk=5, lens_prefix="recompute")
    batch = batch_for(tokenizer, cfg, rows)
    ref, ref_grads = terms_and_grads(model, cfg, batch)
    got, grads = terms_and_grads(model, dict(cfg, readout="tuned"), batch, zero)
    for term in ("loss", "loss_lc", "loss_et"):
        assert torch.equal(got[term], ref[term]), term
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[n], ref_grads[n]) for n in grads)


# -----------------------------------------------------------------------------
# --lens-prefix shared: the lens sequences attend to the L_TFT pass's prompt keys and values


def uneven_rows(rows):
    """The fixture rows and two more: a long prompt with a one-word continuation, a short prompt with a long one
    (prompt lengths differ by more than the continuation)."""
    long_prompt = dict(rows[0], id="long", x_tgt=rows[0]["x_tgt"] * 6, x_en="Yes.", y_en="No.")
    short_prompt = dict(rows[1], id="short", x_tgt="你好", x_en=rows[1]["x_en"] * 3, y_en=rows[1]["y_en"] * 2)
    return [*rows, long_prompt, short_prompt]


def terms_and_grads(model, cfg, batch, lens=None):
    model.zero_grad(set_to_none=True)
    terms = train.DFTObjective(model, cfg, lens)(batch)
    terms["loss"].backward()
    return terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("layers", [(1, 3), (2, 2), (4, 4)])
def test_shared_lens_prefix_equals_recompute(arch, layers, tokenizer, rows):
    model = make_tiny_model(arch, tokenizer)  # eval(): dropout off
    lc, et = layers
    cfg = config("dft-logits", lc_layer_used=lc, et_layer_used=et, ce_chunk=5)
    batch = batch_for(tokenizer, cfg, uneven_rows(rows))
    prompts = (batch["tft"]["labels"] != -100).int().argmax(1)
    continuations = batch["lc"]["attention_mask"].sum(1) - prompts
    assert int(prompts.max() - prompts.min()) > int(continuations.min())
    ref, ref_grads = terms_and_grads(model, dict(cfg, lens_prefix="recompute"), batch)
    got, grads = terms_and_grads(model, dict(cfg, lens_prefix="shared"), batch)
    assert torch.equal(got["loss_tft"], ref["loss_tft"])  # the L_TFT pass computes what it computes without a cache
    for term in ("loss", "loss_lc", "loss_et"):
        torch.testing.assert_close(got[term], ref[term], rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_shared_lens_prefix_equals_recompute_with_the_tuned_readout(tokenizer, rows):
    model = make_tiny_model("llama", tokenizer)
    lens = random_lens(model)
    cfg = config("dft-logits-tuned", lc_layer_used=1, et_layer_used=3, ce_chunk=5)
    batch = batch_for(tokenizer, cfg, uneven_rows(rows))
    ref, ref_grads = terms_and_grads(model, dict(cfg, lens_prefix="recompute"), batch, lens)
    got, grads = terms_and_grads(model, dict(cfg, lens_prefix="shared"), batch, lens)
    assert float(got["lens_recomputed"]) == 0
    for term in ("loss", "loss_lc", "loss_et"):
        torch.testing.assert_close(got[term], ref[term], rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def tiny_gemma(arch, tokenizer, window):
    """A tiny Gemma-2 (softcaps, every other block sliding) or Gemma-3 (local and global blocks) with a given window."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from conftest import TINY_CONFIGS
    torch.manual_seed(0)
    extra = dict(layer_types=["sliding_attention", "full_attention"] * 2)
    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                                  **dict(TINY_CONFIGS["gemma2"], sliding_window=window, **extra))
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_shared_lens_prefix_on_gemma_windows(arch, tokenizer, rows):
    """Shared while the longest prompt plus the continuation fits in the sliding window (exact, the window cuts
    nothing); one token more and the batch falls back to recompute, counted."""
    cfg = config("dft-logits", lc_layer_used=1, et_layer_used=3, ce_chunk=5)
    batch = batch_for(tokenizer, cfg, uneven_rows(rows)[-2:])
    prompts = (batch["tft"]["labels"] != -100).int().argmax(1)
    fits = max(int(prompts.max() + (batch[name]["attention_mask"].sum(1) - prompts).max()) for name in ("lc", "et"))
    for window, fallback in ((512, 0.0), (fits, 0.0), (fits - 1, 1.0)):
        model = tiny_gemma(arch, tokenizer, window)
        ref, ref_grads = terms_and_grads(model, dict(cfg, lens_prefix="recompute"), batch)
        got, grads = terms_and_grads(model, dict(cfg, lens_prefix="shared"), batch)
        assert float(got["lens_recomputed"]) == fallback and float(ref["lens_recomputed"]) == 0, window
        assert torch.equal(got["loss_tft"], ref["loss_tft"])
        for term in ("loss", "loss_lc", "loss_et"):
            torch.testing.assert_close(got[term], ref[term], rtol=1e-5, atol=1e-6)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_shared_lens_prefix_without_continuation_recomputes(tokenizer, rows):
    """max-length cut every x_en token: the batch recomputes (the lens passes still run, as on every other rank)."""
    model = make_tiny_model("llama", tokenizer)
    cfg = config("dft-logits", lc_layer_used=1, et_layer_used=3)
    batch = batch_for(tokenizer, cfg, rows[:1])
    prompt = int((batch["tft"]["labels"] != -100).int().argmax(1))
    batch["lc"] = {k: v[:, :prompt] for k, v in batch["lc"].items()}
    ref, ref_grads = terms_and_grads(model, dict(cfg, lens_prefix="recompute"), batch)
    got, grads = terms_and_grads(model, dict(cfg, lens_prefix="shared"), batch)
    assert float(got["lens_recomputed"]) == 1 and float(got["loss_lc"]) == 0
    assert torch.equal(got["loss"], ref["loss"])
    assert all(torch.equal(grads[name], ref_grads[name]) for name in ref_grads)


def test_shared_lens_prefix_fallbacks_are_counted_in_the_log(tmp_path, tiny_model_dirs):
    """The shipped tiny Gemma-2 has a 16-token window, shorter than any prompt: every micro-batch recomputes."""
    _, log = run(tmp_path, "gemma", "--method", "dft-logits", "--max-steps", "2", "--lc-layer", "1", "--et-layer", "3",
                 "--batch-size", "2", "--grad-accum", "2", "--lens-prefix", "shared",
                 model_dir=tiny_model_dirs["gemma2"])
    assert [r["lens_recomputed"] for r in log] == [2, 2]


def test_shared_lens_prefix_falls_back_under_checkpointing_and_alternation(tmp_path, tiny_model_dirs, capsys):
    flags = ["--method", "dft-logits", "--max-steps", "2", "--lc-layer", "1", "--et-layer", "3", "--mixed-precision",
             "no", "--lens-prefix", "shared"]
    _, log = run(tmp_path, "ckpt", *flags, "--grad-checkpointing", model_dir=tiny_model_dirs["llama"])
    assert [r["lens_recomputed"] for r in log] == [1, 1]
    assert capsys.readouterr().out.count("falls back to recompute under --grad-checkpointing") == 1
    # --alternate: the task steps have no lens term, the alignment steps no L_TFT pass to share
    _, log = run(tmp_path, "alt", *flags, "--alternate", "--max-steps", "4", model_dir=tiny_model_dirs["llama"])
    _, log_ref = run(tmp_path, "alt-ref", *flags[:-1], "recompute", "--alternate", "--max-steps", "4",
                     model_dir=tiny_model_dirs["llama"])
    assert [(r["phase"], r["lens_recomputed"]) for r in log] == [("task", 0), ("align", 1)] * 2
    assert [r["loss"] for r in log] == [r["loss"] for r in log_ref]


def test_resume_reads_a_checkpoint_without_lens_prefix_as_recompute(tmp_path, tiny_model_dirs):
    """A run from before the flag recomputed; at today's default (shared) its resume is refused, naming the setting,
    unless the method has no lens term (then the flag changes nothing). Without `readout` it read the logit lens."""
    for method, refused in (("dft-logits", True), ("dft-feature", False)):
        out = str(tmp_path / method)
        base = ["--pairs", PAIRS, "--out", out, "--model", tiny_model_dirs["llama"], "--method", method,
                "--lc-layer", "1", "--et-layer", "3", "--max-steps", "3", "--save-every", "1"]
        train.main(base + ["--lens-prefix", "recompute", "--stop-after-steps", "1"])
        path = os.path.join(out, "train_config.json")
        saved = json.load(open(path))
        for key in ("lens_prefix", "readout", "tuned_lens_sha256"):  # as written before these flags existed
            del saved[key]
        common.write_json(path, saved)
        if refused:
            with pytest.raises(common.UserError, match="lens_prefix: 'recompute' -> 'shared'"):
                train.main(base + ["--resume", "--stop-after-steps", "2"])
            base += ["--lens-prefix", "recompute"]
        train.main(base + ["--resume", "--stop-after-steps", "2"])
        assert len(read_log_of(out)) == 2, method


def test_shared_lens_prefix_equals_recompute_with_lora(tokenizer, rows):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(make_tiny_model("llama", tokenizer), LoraConfig(
        r=4, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False))
    cfg = config("dft-logits", lc_layer_used=2, et_layer_used=3, tft_weight=0.0)
    batch = batch_for(tokenizer, cfg, uneven_rows(rows))
    ref, ref_grads = terms_and_grads(model, dict(cfg, lens_prefix="recompute"), batch)
    got, grads = terms_and_grads(model, dict(cfg, lens_prefix="shared"), batch)
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and all("lora_" in name for name in grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_shared_lens_prefix_trains_like_recompute(tmp_path, tiny_model_dirs):
    flags = ["--method", "dft-logits", "--max-steps", "3", "--lc-layer", "1", "--et-layer", "3", "--mixed-precision",
             "no", "--batch-size", "2", "--grad-accum", "2"]
    # LLaMA: no dropout (GPT-2's would draw other masks: the prompt runs once instead of three times)
    ref, log_ref = run(tmp_path, "recompute", *flags, "--lens-prefix", "recompute", model_dir=tiny_model_dirs["llama"])
    got, log = run(tmp_path, "shared", *flags, model_dir=tiny_model_dirs["llama"])  # the default
    assert json.load(open(os.path.join(got, "train_config.json")))["lens_prefix"] == "shared"
    assert all(r["lens_recomputed"] == 0 for r in log) and all("lens_recomputed" not in r for r in log_ref)
    for a, b in zip(log_ref, log):
        for term in ("loss", "loss_tft", "loss_lc", "loss_et", "grad_norm"):
            assert b[term] == pytest.approx(a[term], rel=1e-5), (a["step"], term)
    wa, wb = weights(ref), weights(got)
    # Adam divides by sqrt(v): where a gradient is near zero, float rounding (thread count, summation order)
    # becomes a visible share of one step's update (lr 2e-5); a quarter of it bounds the drift of 3 steps
    assert all(torch.allclose(wa[k], wb[k], atol=5e-6) for k in wa)


def test_shared_lens_prefix_runs_only_the_continuation(tokenizer, rows, monkeypatch):
    """The lens passes see only the x_en / y_en tokens, never the prompt again."""
    model = make_tiny_model("llama", tokenizer)
    cfg = config("dft-logits", lc_layer_used=1, et_layer_used=3, lens_prefix="shared")
    batch = batch_for(tokenizer, cfg, rows)
    widths = []
    hook = model.model.layers[0].register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    train.DFTObjective(model, cfg)(batch)
    hook.remove()
    prompts = (batch["tft"]["labels"] != -100).int().argmax(1)
    expected = [int((batch[name]["attention_mask"].sum(1) - prompts).max()) for name in ("lc", "et")]
    assert widths == [batch["tft"]["input_ids"].shape[1], *expected]


def test_feature_losses_zero_for_identical_inputs(tokenizer, rows):
    model = make_tiny_model("llama", tokenizer)
    cfg = config("dft-feature", lc_layer_used=2, et_layer_used=4)
    same = [dict(r, x_tgt=r["x_en"]) for r in rows]
    terms = train.DFTObjective(model, cfg)(batch_for(tokenizer, cfg, same))
    assert float(terms["loss_lc"].detach()) == pytest.approx(0, abs=1e-5)
    # ET compares norm(h_j) of the target with h_L of English: zero when j == L and the inputs agree
    assert float(terms["loss_et"]) == pytest.approx(0, abs=1e-5)
    terms = train.DFTObjective(model, cfg)(batch_for(tokenizer, cfg, rows))
    assert float(terms["loss_lc"]) > 1e-3 and float(terms["loss_et"]) > 1e-3


def test_feature_pooling_ignores_template_tokens(tokenizer, rows):
    """Changing only the template tokens' states must not move the pooled vector."""
    h = torch.randn(1, 10, 4)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0, 0, 0]])
    h2 = h.clone()
    h2[:, [0, 1, 5, 9]] += 100
    torch.testing.assert_close(train.pool(h, mask, "mean"), train.pool(h2, mask, "mean"))
    torch.testing.assert_close(train.pool(h, mask, "mean"), h[:, 2:5].mean(1))
    torch.testing.assert_close(train.pool(h, mask, "last"), h[:, 4])


@pytest.mark.parametrize("feature_grad", ["target", "both"])
def test_feature_grad_english_branch(feature_grad, tokenizer, rows):
    model = make_tiny_model("llama", tokenizer)
    cfg = config("dft-feature", feature_grad=feature_grad)
    objective = train.DFTObjective(model, cfg)
    batch = batch_for(tokenizer, cfg, rows)
    states, last = objective.english_states(common.model_parts(model), batch["en"])
    assert states[1].requires_grad == (feature_grad == "both") and last.requires_grad == (feature_grad == "both")
    objective(batch)["loss"].backward()  # the target branch still trains


def run(tmp_path, name, *flags, model_dir, pairs=PAIRS, lr="3e-3"):
    out = str(tmp_path / name)
    train.main(["--pairs", pairs, "--out", out, "--model", model_dir, "--batch-size", "4", "--lr", lr,
                "--warmup-ratio", "0", *flags])
    return out, [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def test_zero_weights_equal_tft_bit_for_bit(tmp_path, tiny_model_dirs):
    common_flags = ["--max-steps", "3", "--lc-layer", "1", "--et-layer", "3"]
    tft, _ = run(tmp_path, "tft", "--method", "tft", *common_flags, model_dir=tiny_model_dirs["llama"])
    for method, more in (("dft-logits", ["--lens-prefix", "recompute"]), ("dft-feature", []),
                         ("dft-logits", ["--lens-prefix", "shared"])):
        dft, log = run(tmp_path, method + "".join(more), "--method", method, "--lc-weight", "0", "--et-weight", "0",
                       *common_flags, *more, model_dir=tiny_model_dirs["llama"])
        a, b = weights(tft), weights(dft)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert log[0]["loss_lc"] > 0 and log[0]["loss_et"] > 0  # still computed, for the log


@pytest.mark.parametrize("method", ["sft", "tft", "dft-logits", "dft-feature"])
def test_each_method_drives_its_terms_down(method, tmp_path, tiny_model_dirs, rows):
    """Overfit four pairs (one batch): every term the method optimises must fall."""
    four = str(tmp_path / "four.jsonl")
    common.write_jsonl(four, rows)
    _, log = run(tmp_path, method, "--method", method, "--max-steps", "25", "--lc-layer", "2", "--et-layer", "3",
                 model_dir=tiny_model_dirs["llama"], pairs=four, lr="1e-2")
    assert len(log) == 25
    assert set(log[0]) >= {"step", "loss", "loss_tft", "loss_lc", "loss_et", "lr", "grad_norm", "tokens", "seconds"}
    for term in ("loss_tft", "loss_lc", "loss_et"):
        if log[0][term] is not None:
            first, last = sum(r[term] for r in log[:3]) / 3, sum(r[term] for r in log[-3:]) / 3
            assert last < first - 0.1, (method, term, first, last)  # one fixed batch: no noise


def test_resume_reproduces_uninterrupted_run(tmp_path, tiny_model_dirs):
    flags = ["--method", "dft-logits", "--max-steps", "6", "--lc-layer", "1", "--et-layer", "3", "--save-every", "2",
             "--warmup-ratio", "0.2"]
    full, log_full = run(tmp_path, "full", *flags, model_dir=tiny_model_dirs["llama"])
    out = str(tmp_path / "cut")
    base = ["--pairs", PAIRS, "--out", out, "--model", tiny_model_dirs["llama"], "--batch-size", "4", "--lr", "3e-3",
            *flags]
    train.main(base + ["--stop-after-steps", "3"])  # interrupted after step 3; the checkpoint is from step 2
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    train.main(base + ["--resume"])
    log_cut = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    assert [r["step"] for r in log_cut] == list(range(1, 7))
    for a, b in zip(log_full, log_cut):
        for k in ("loss", "loss_tft", "loss_lc", "loss_et", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["step"], k)
    wa, wb = weights(full), weights(out)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_train_config_records_everything(tmp_path, tiny_model_dirs):
    out, _ = run(tmp_path, "cfg", "--method", "dft-feature", "--max-steps", "1", "--lc-layer", "1", "--et-layer", "3",
                 model_dir=tiny_model_dirs["gpt2"])
    cfg = json.load(open(os.path.join(out, "train_config.json")))
    assert cfg["lc_layer_used"] == 1 and cfg["et_layer_used"] == 3 and cfg["layers_why"] == {"lc": "flag", "et": "flag"}
    assert cfg["pairs_sha256"] == common.sha256_file(PAIRS) and cfg["versions"]["torch"] == torch.__version__
    assert cfg["global_batch"] == 4 and cfg["total_steps"] == 1
    model, _ = common.load_model_and_tokenizer(out)  # a normal HF folder
    assert type(model).__name__ == "GPT2LMHeadModel"


def test_layers_why_tells_a_typed_layer_from_the_presets(tmp_path, tiny_model_dirs, monkeypatch):
    monkeypatch.setitem(train.PRESETS, "tiny", dict(lc_layer="1", et_layer="3"))
    out, _ = run(tmp_path, "cfg", "--preset", "tiny", "--method", "dft-logits", "--max-steps", "1", "--et-layer", "2",
                 model_dir=tiny_model_dirs["gpt2"])
    cfg = json.load(open(os.path.join(out, "train_config.json")))
    assert (cfg["lc_layer_used"], cfg["et_layer_used"]) == (1, 2)
    assert cfg["layers_why"] == {"lc": "preset", "et": "flag"}


def test_pick_layers_on_synthetic_curves():
    # two plateaus ending at blocks 3 and 12 of 16 (drops of 2.0 and 1.5), noise elsewhere
    curve = [8.0, 7.9, 5.9, 5.85, 5.8, 5.82, 5.7, 5.75, 5.6, 5.65, 5.6, 4.1, 4.0, 3.9, 3.0, 1.0]
    assert train.pick_layers(curve) == (3, 12)
    # the largest drop may come second in depth: order is by block, not by size
    curve = [6.0, 5.9, 5.8, 5.0, 5.0, 4.9, 4.8, 4.7, 2.0, 1.9, 1.8, 1.0]
    assert train.pick_layers(curve) == (4, 9)
    # one steep slope over two blocks is one drop: the second pick must be min_gap blocks away
    curve = [9.0, 9.0, 6.0, 3.5, 3.5, 3.4, 3.4, 3.3, 3.3, 2.5, 2.5, 2.4, 2.4, 2.4, 2.3, 0.5]
    assert train.pick_layers(curve) == (3, 10)
    with pytest.raises(common.UserError):
        train.pick_layers([3.0, 2.0, 1.0])


def test_auto_layers_write_curve(tmp_path, tokenizer):
    model = make_tiny_model("llama", tokenizer)
    model.config.num_hidden_layers = 8
    deep = type(model)(model.config)
    folder = str(tmp_path / "deep")
    deep.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out, _ = run(tmp_path, "auto", "--method", "dft-logits", "--max-steps", "1", model_dir=folder)
    curve = json.load(open(os.path.join(out, "layer_entropy.json")))
    cfg = json.load(open(os.path.join(out, "train_config.json")))
    assert len(curve["entropy_by_block"]) == 8
    assert (cfg["lc_layer_used"], cfg["et_layer_used"]) == train.pick_layers(curve["entropy_by_block"])
    assert cfg["layers_why"]["lc"].startswith("auto") and os.path.getsize(os.path.join(out, "layer_entropy.png")) > 1000


def test_resume_keeps_the_auto_layers_and_says_what_growing_a_finished_run_retrains(tmp_path, tokenizer,
                                                                                      monkeypatch, capsys):
    model = make_tiny_model("llama", tokenizer)
    model.config.num_hidden_layers = 8
    folder = str(tmp_path / "deep")
    type(model)(model.config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = str(tmp_path / "auto")
    argv = ["--pairs", PAIRS, "--out", out, "--model", folder, "--batch-size", "4", "--method", "dft-logits",
            "--save-every", "2", "--warmup-ratio", "0"]
    train.main(argv + ["--max-steps", "3", "--stop-after-steps", "2"])
    picked = [json.load(open(os.path.join(out, "train_config.json")))[f"{k}_layer_used"] for k in ("lc", "et")]
    monkeypatch.setattr(common, "lens_entropy_curve", lambda *a, **k: pytest.fail("the entropy rule ran again"))
    train.main(argv + ["--max-steps", "3", "--resume"])  # steps 3; the final model, no checkpoint at step 3
    cfg = json.load(open(os.path.join(out, "train_config.json")))
    assert [cfg[f"{k}_layer_used"] for k in ("lc", "et")] == picked and cfg["layers_why"]["lc"].startswith("auto")
    capsys.readouterr()
    train.main(argv + ["--max-steps", "4", "--resume"])  # grown from the step-2 checkpoint
    assert "steps 3-3 are trained again, their log lines replaced (a finished run" in capsys.readouterr().out
    assert [r["step"] for r in map(json.loads, open(os.path.join(out, "train_log.jsonl")))] == [1, 2, 3, 4]
    assert stat.S_IMODE(os.stat(os.path.join(out, "model.safetensors")).st_mode) == 0o666 & ~common.UMASK
    shutil.rmtree(os.path.join(out, "checkpoint"))
    code, err = run_main_in_process(train.main, argv + ["--max-steps", "5"], capsys)
    assert code == 2 and "already holds a training run without a checkpoint to continue from" in err


def test_bad_input_errors(tmp_path, tiny_model_dirs, capsys):
    model = tiny_model_dirs["llama"]
    out = str(tmp_path / "o")
    cases = [
        (["--lc-layer", "2", "--et-layer", "9", "--method", "dft-logits"], "out of range: this model has blocks 1..4"),
        (["--lc-layer", "3", "--et-layer", "2", "--method", "dft-logits"], "pass --allow-layer-order"),
        (["--method", "sft", "--lc", "logits"], "English only"),
        (["--max-length", "10"], "no pair fits --max-length 10"),
        (["--global-batch-size", "6"], "not a multiple"),
        (["--max-steps", "-3"], "--max-steps must be >= 1, got -3"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "1", "x_en": "a", "y_en": "b", "x_tgt": "c"}) + "\n")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    (tmp_path / "afile").write_text("")
    cases += [(["--pairs", str(bad)], "line 1: missing or non-string field(s) ['y_tgt']"),
              (["--pairs", str(tmp_path / "none.jsonl")], "file not found"),
              (["--pairs", str(tmp_path)], "is a folder, not a file"),
              (["--pairs", str(tmp_path / "list.jsonl")], "line 1 is a JSON list, not an object"),
              (["--lc-layer", "9", "--method", "dft-logits"], "--lc-layer 9 is out of range"),  # before the rule runs
              (["--lc-layer", "six", "--method", "dft-logits"], "--lc-layer must be a block number"),
              (["--lc-layer", "0", "--method", "dft-logits"], "--lc-layer 0 is out of range: blocks are numbered"),
              (["--out", str(tmp_path / "afile")], "is a file; give a folder")]
    # every case refuses before anything is written, so they can share --out; the first goes through the command
    # line itself, the others through the same common.run_main in this process
    argvs = [["--pairs", PAIRS, "--out", out, "--model", model, "--max-steps", "1", *flags] for flags, _ in cases]
    r = run_stage("02_train_dft.py", *argvs[0])
    results = [(r.returncode, r.stderr)] + [run_main_in_process(train.main, argv, capsys) for argv in argvs[1:]]
    for (flags, message), (code, stderr) in zip(cases, results):
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in stderr, (flags, stderr)
    assert not os.path.exists(out)  # not even an empty folder


# -----------------------------------------------------------------------------
# configuration: typed flag > --method > --preset > default


def resolved(*flags):
    return train.resolve_config(train.parse_args(["--pairs", "p.jsonl", "--out", "o", *flags]))


def test_presets_and_methods_resolve_as_recorded():
    """tests/fixtures/train_configs.json was written by tests/fixtures/make_train_configs.py with 02_train_dft.py as
    it was before its argparse flags got real defaults (every default None, merged in resolve_config): every preset
    x method, and a few typed flags, must still resolve to those configurations (plus the flags added since, at
    their defaults)."""
    recorded = json.load(open(os.path.join(REPO, "tests", "fixtures", "train_configs.json")))
    methods_then = ["sft", "tft", "dft-logits", "dft-feature", "mid-align"]  # the fixture's; a method added since
    assert set(methods_then) <= set(train.METHODS)  # is not in it (and does not fail this test)
    assert len(recorded) == (len(train.PRESETS) + 1) * (len(methods_then) + 1) + 7
    added = dict(lens_prefix="shared", readout="logit", tuned_lens=None, layer_rule_readout="logit")
    for case in recorded:
        assert resolved(*case["flags"]) == dict(case["config"], **added), case["flags"]


def test_a_typed_flag_at_its_default_beats_preset_and_method(monkeypatch):
    assert resolved("--preset", "smollm2-135m")["batch_size"] == 8
    assert resolved("--preset", "smollm2-135m", "--batch-size", "4")["batch_size"] == 4  # 4 is the default
    assert resolved("--preset", "llama2-7b", "--dtype", "float32")["dtype"] == "float32"
    assert resolved("--preset", "llama2-7b", "--lc-layer", "auto")["lc_layer"] == "auto"
    cfg = resolved("--preset", "llama2-7b", "--method", "mid-align")  # the method's own settings beat the preset's
    assert (cfg["et_layer"], cfg["feature_grad"]) == ("mid", "both")
    cfg = resolved("--preset", "llama2-7b", "--method", "mid-align", "--et-layer", "auto", "--feature-grad", "target")
    assert (cfg["et_layer"], cfg["feature_grad"]) == ("auto", "target")
    monkeypatch.setitem(train.PRESETS, "short", dict(max_length=256, epochs=1))
    assert resolved("--preset", "short")["max_length"] == 256
    assert resolved("--preset", "short", "--max-length", "512")["max_length"] == 512
    assert resolved("--preset", "short", "--epochs", "3")["epochs"] == 3


def test_help_shows_the_real_defaults():
    text = " ".join(train.build_parser().format_help().split())
    for shown in ("--lr LR peak learning rate (default: 2e-05)", "(default: 512)", "(default: tft)",
                  "(default: q_proj,k_proj,v_proj,o_proj)", "(0: only the final model) (default: 0)"):
        assert shown in text, shown
    assert "default: None" not in text and "default: False" not in text


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be a positive number, got 0.0"),
    (["--epochs", "-1"], "--epochs must be a positive number"),
    (["--epochs", "nan"], "--epochs must be a positive number"),
    *[([f"--{name}", "0"], f"--{name} must be >= 1, got 0") for name in (
        "max-steps", "batch-size", "grad-accum", "global-batch-size", "max-length", "eval-every", "eval-limit",
        "log-every", "layer-sample")],
    (["--max-steps", "-3"], "--max-steps must be >= 1, got -3"),
    *[([f"--{name}", "-1"], f"--{name} must be >= 0") for name in (
        "save-every", "ce-chunk", "lc-weight", "et-weight", "tft-weight", "lr", "warmup-ratio")],
    (["--lr", "nan"], "--lr must be >= 0"),
])
def test_bad_numbers_are_refused_before_any_model_loads(flags, message, tmp_path):
    out = str(tmp_path / "o")
    eval_pairs = ["--eval-pairs", PAIRS] if "--eval-every" in flags else []
    with pytest.raises(common.UserError) as e:  # a missing --model: reaching the loader would raise another error
        train.main(["--pairs", PAIRS, "--out", out, "--model", str(tmp_path / "no-model"), *eval_pairs, *flags])
    assert str(e.value).startswith(message), str(e.value)
    assert not os.path.exists(out)


def test_documented_zeros_are_accepted():
    cfg = resolved("--save-every", "0", "--ce-chunk", "0", "--max-grad-norm", "0", "--lc-weight", "0", "--et-weight",
                   "0", "--tft-weight", "0", "--warmup-ratio", "0", "--lr", "0", "--method", "dft-logits")
    assert [cfg[k] for k in ("save_every", "ce_chunk", "max_grad_norm", "lc_weight", "warmup_ratio")] == [0] * 5


def test_layer_order_allowed_with_flag(tmp_path, tiny_model_dirs):
    out, log = run(tmp_path, "order", "--method", "dft-logits", "--max-steps", "1", "--lc-layer", "3", "--et-layer",
                   "2", "--allow-layer-order", model_dir=tiny_model_dirs["llama"])
    assert len(log) == 1


def test_truncation_is_counted(tmp_path, tiny_model_dirs):
    out, _ = run(tmp_path, "trunc", "--max-steps", "1", "--max-length", "80", model_dir=tiny_model_dirs["llama"])
    stats = json.load(open(os.path.join(out, "train_config.json")))["length_stats"]
    assert stats.get("truncated_tft", 0) + stats.get("dropped_prompt_too_long", 0) > 0


def test_nan_loss_stops_with_step_and_ids(tmp_path, tiny_model_dirs):
    out = str(tmp_path / "nan")
    with pytest.raises(common.UserError, match=r"non-finite loss at step \d+ .*pair ids \['alpaca-"):
        train.main(["--pairs", PAIRS, "--out", out, "--model", tiny_model_dirs["llama"], "--max-steps", "6",
                    "--lr", "1e30", "--max-grad-norm", "1e30", "--save-every", "1", "--warmup-ratio", "0"])
    assert os.path.isdir(os.path.join(out, "checkpoint")) and not os.path.exists(os.path.join(out, "model.safetensors"))


def test_existing_run_is_not_overwritten(tmp_path, tiny_model_dirs):
    out, _ = run(tmp_path, "again", "--max-steps", "1", model_dir=tiny_model_dirs["llama"])
    with pytest.raises(common.UserError, match="already holds a training run"):
        run(tmp_path, "again", "--max-steps", "1", model_dir=tiny_model_dirs["llama"])


# -----------------------------------------------------------------------------
# mixed precision (--mixed-precision)


def test_mixed_precision_resolution(monkeypatch):
    monkeypatch.setattr(common, "native_bf16", lambda device: device == "cuda")
    assert train.resolve_mixed_precision("auto", None, "cuda")[0] == "bf16"
    assert train.resolve_mixed_precision("auto", None, "cpu")[0] == "no"  # emulated bf16 would be slower
    assert train.resolve_mixed_precision("bf16", None, "cpu")[0] == "bf16"  # asked for: runs (with a warning)
    assert train.resolve_mixed_precision("auto", "fp16", "cuda")[0] == "fp16"  # the launcher decides under auto
    assert train.resolve_mixed_precision("bf16", "bf16", "cuda")[0] == "bf16"
    with pytest.raises(common.UserError, match="disagrees with the launcher's mixed precision bf16"):
        train.resolve_mixed_precision("no", "bf16", "cuda")


@pytest.mark.parametrize("method", ["sft", "tft", "dft-logits", "dft-feature"])
def test_bf16_autocast_trains_like_float32(method, tmp_path, tiny_model_dirs):
    flags = ["--method", method, "--max-steps", "3", "--lc-layer", "1", "--et-layer", "3"]
    fp32, log32 = run(tmp_path, "fp32", *flags, "--mixed-precision", "no", model_dir=tiny_model_dirs["llama"])
    bf16, log16 = run(tmp_path, "bf16", *flags, "--mixed-precision", "bf16", model_dir=tiny_model_dirs["llama"])
    assert json.load(open(os.path.join(bf16, "train_config.json")))["mixed_precision"] == "bf16"
    assert json.load(open(os.path.join(fp32, "train_config.json")))["mixed_precision"] == "no"
    assert all(w.dtype == torch.float32 for w in weights(bf16).values())  # float32 master weights
    for a, b in zip(log32, log16):
        for term in ("loss", "loss_tft", "loss_lc", "loss_et"):
            if a[term] is not None:
                assert b[term] == pytest.approx(a[term], rel=0.03), (method, a["step"], term)
    assert any(log32[i]["loss"] != log16[i]["loss"] for i in range(3))  # bf16 really ran


def test_mixed_precision_bf16_on_emulating_hardware_warns(tmp_path, tiny_model_dirs, monkeypatch, capsys):
    monkeypatch.setattr(common, "native_bf16", lambda device: False)
    out, _ = run(tmp_path, "emu", "--max-steps", "1", "--mixed-precision", "bf16", model_dir=tiny_model_dirs["llama"])
    assert capsys.readouterr().out.count("is emulated") == 1
    cfg = json.load(open(os.path.join(out, "train_config.json")))
    assert cfg["mixed_precision"] == "bf16" and cfg["mixed_precision_why"] == "--mixed-precision"


# -----------------------------------------------------------------------------
# held-out loss and tracking


@pytest.mark.parametrize("method", ["dft-logits", "dft-feature"])
def test_heldout_losses_equal_a_direct_computation(method, tmp_path, tiny_model_dirs, tokenizer):
    out, log = run(tmp_path, "ev", "--method", method, "--max-steps", "3", "--lc-layer", "1", "--et-layer", "3",
                   "--mixed-precision", "no", "--eval-pairs", PAIRS, "--eval-every", "2", "--eval-limit", "5",
                   model_dir=tiny_model_dirs["llama"])
    assert [r["step"] for r in log if "eval_loss" in r] == [2, 3]  # every 2 steps and after the last
    final = log[-1]
    cfg = json.load(open(os.path.join(out, "train_config.json")))
    assert cfg["eval_summary"]["final"]["eval_loss"] == final["eval_loss"] and cfg["num_eval_examples"] == 5
    # the saved model, all 5 held-out pairs in one batch: its means are the global means
    model, _ = common.load_model_and_tokenizer(out)
    dcfg = config(method, lc_layer_used=1, et_layer_used=3)
    with torch.no_grad():
        terms = train.DFTObjective(model.eval(), dcfg)(batch_for(tokenizer, dcfg, train.load_pairs(PAIRS)[:5]))
    for term in ("loss", "loss_tft", "loss_lc", "loss_et"):
        assert final[f"eval_{term}"] == pytest.approx(float(terms[term]), rel=1e-5), term


def test_report_to_tensorboard_writes_the_logged_scalars(tmp_path, tiny_model_dirs):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, log = run(tmp_path, "tb", "--method", "dft-logits", "--max-steps", "2", "--lc-layer", "1", "--et-layer", "3",
                   "--eval-pairs", PAIRS, "--eval-limit", "4", "--report-to", "tensorboard", "--run-name", "tbrun",
                   model_dir=tiny_model_dirs["llama"])
    events = EventAccumulator(os.path.join(out, "tbrun")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "loss_tft", "loss_lc", "loss_et", "lr", "grad_norm", "eval_loss", "eval_loss_lc"} <= tags
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    assert events.Scalars("loss_et")[1].value == pytest.approx(log[1]["loss_et"], rel=1e-6)
    assert events.Scalars("eval_loss")[0].value == pytest.approx(log[1]["eval_loss"], rel=1e-6)


def test_heldout_and_tracker_errors_before_training(tmp_path, tiny_model_dirs, capsys):
    model, out = tiny_model_dirs["llama"], str(tmp_path / "o")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "x_en": "a"\n')
    cases = [(["--eval-pairs", str(tmp_path / "missing.jsonl")], "file not found"),
             (["--eval-pairs", str(bad)], "line 1 is not a JSON object"),
             (["--eval-every", "5"], "--eval-every needs --eval-pairs"),
             (["--max-grad-norm", "-1"], "must be >= 0")]
    import importlib.util
    if importlib.util.find_spec("wandb") is None:
        cases.append((["--report-to", "wandb"], "pip install wandb"))
    for flags, message in cases:  # the command line's own path: test_bad_input_errors
        code, stderr = run_main_in_process(train.main, ["--pairs", PAIRS, "--out", out, "--model", model,
                                                        "--max-steps", "1", *flags], capsys)
        assert code == 2 and message in stderr, (flags, stderr[-2000:])
    assert not os.path.exists(out)  # nothing written


# -----------------------------------------------------------------------------
# failure modes at scale (clipping off, resume checks, empty fields, checkpoint swap)


@pytest.mark.parametrize("value", ["0", "none"])
def test_max_grad_norm_zero_disables_clipping(value, tmp_path, tiny_model_dirs):
    flags = ["--max-steps", "2", "--lr", "1e-2", "--mixed-precision", "no"]
    off, log_off = run(tmp_path, "off", *flags, "--max-grad-norm", value, model_dir=tiny_model_dirs["llama"])
    huge, log_huge = run(tmp_path, "huge", *flags, "--max-grad-norm", "1e9", model_dir=tiny_model_dirs["llama"])
    start = load_file(os.path.join(tiny_model_dirs["llama"], "model.safetensors"))
    a, b = weights(off), weights(huge)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained
    assert all(torch.equal(a[k], b[k]) for k in a)  # and nothing was clipped
    assert log_off[0]["grad_norm"] == pytest.approx(log_huge[0]["grad_norm"]) and log_off[0]["grad_norm"] > 0
    assert json.load(open(os.path.join(off, "train_config.json")))["max_grad_norm"] == 0.0


def test_resume_refuses_a_changed_configuration(tmp_path, tiny_model_dirs):
    out = str(tmp_path / "seg")
    base = ["--pairs", PAIRS, "--out", out, "--model", tiny_model_dirs["llama"], "--batch-size", "4", "--lr", "3e-3",
            "--method", "dft-logits", "--lc-layer", "1", "--et-layer", "3", "--max-steps", "4", "--save-every", "2"]
    train.main(base + ["--stop-after-steps", "2"])
    before = {name: open(os.path.join(out, name)).read() for name in ("train_config.json", "train_log.jsonl")}
    for flags, named in ((["--lr", "1e-3"], "lr: 0.003 -> 0.001"), (["--seed", "7"], "seed: 42 -> 7"),
                         (["--batch-size", "2"], "batch_size: 4 -> 2"), (["--et-layer", "2"], "et_layer_used: 3 -> 2"),
                         (["--max-steps", "2"], "leaves nothing to train after the checkpoint's step 2"),
                         (["--max-steps", "3"], "total_steps: 4 -> 3")):
        with pytest.raises(common.UserError, match="differs from the run's") as e:
            train.main(base + flags + ["--resume"])
        assert named in str(e.value), str(e.value)
        assert {name: open(os.path.join(out, name)).read() for name in before} == before  # nothing touched
    train.main(base[:-4] + ["--max-steps", "5", "--save-every", "2", "--resume"])  # --max-steps may grow
    cfg = json.load(open(os.path.join(out, "train_config.json")))
    assert [s["start_step"] for s in cfg["segments"]] == [0, 2] and cfg["segments"][0]["total_steps"] == 4
    assert cfg["total_steps"] == 5 and len(open(os.path.join(out, "train_log.jsonl")).readlines()) == 5


def test_empty_fields_are_refused_with_line_and_id(tmp_path, tiny_model_dirs):
    rows = train.load_pairs(PAIRS)[:4]
    rows[2] = dict(rows[2], x_en="  \n")
    path = str(tmp_path / "empty.jsonl")
    common.write_jsonl(path, rows)
    r = run_stage("02_train_dft.py", "--pairs", path, "--out", str(tmp_path / "o"), "--model", tiny_model_dirs["llama"],
                  "--method", "dft-feature", "--lc-layer", "1", "--et-layer", "3")
    message = f"line 3 (id {rows[2]['id']!r}): empty or whitespace-only field(s) ['x_en']"
    assert r.returncode == 2 and message in r.stderr


def test_resume_finds_the_newest_complete_checkpoint(tmp_path, tiny_model_dirs):
    """A kill during the checkpoint swap leaves the complete one as checkpoint.old or checkpoint.tmp."""
    flags = ["--method", "tft", "--max-steps", "4", "--save-every", "2", "--mixed-precision", "no"]
    full, log_full = run(tmp_path, "full", *flags, model_dir=tiny_model_dirs["llama"])
    out = str(tmp_path / "cut")
    base = ["--pairs", PAIRS, "--out", out, "--model", tiny_model_dirs["llama"], "--batch-size", "4", "--lr", "3e-3",
            "--warmup-ratio", "0", *flags]
    train.main(base + ["--stop-after-steps", "3"])
    os.replace(os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.old"))  # killed mid-swap
    os.makedirs(os.path.join(out, "checkpoint.tmp"))  # an incomplete newer one (no step.json)
    assert train.latest_checkpoint(out) == (os.path.join(out, "checkpoint.old"), 2)
    train.main(base + ["--resume"])
    assert [r["loss"] for r in read_log_of(out)] == pytest.approx([r["loss"] for r in log_full], rel=1e-6)
    assert all(torch.allclose(weights(full)[k], weights(out)[k], atol=1e-6) for k in weights(full))


def read_log_of(out):
    return [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]


# -----------------------------------------------------------------------------
# the contrastive signal (mid-align, the peer)


def test_info_nce_equals_a_direct_computation():
    import math
    torch.manual_seed(0)
    t, e = torch.randn(5, 8), torch.randn(5, 8)
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))
    for temperature in (0.1, 0.5):
        reference = 0.0
        for a in range(5):
            to_en = [cos(t[a], e[b]) / temperature for b in range(5)]  # target a against every English b
            to_tgt = [cos(e[a], t[b]) / temperature for b in range(5)]  # English a against every target b
            for scores in (to_en, to_tgt):
                reference += 0.5 * (math.log(sum(math.exp(x) for x in scores)) - scores[a])
        assert float(train.contrastive_loss(t, e, temperature)) == pytest.approx(reference, rel=1e-5)


def test_info_nce_near_its_minimum_for_identical_separated_pairs():
    v = torch.eye(8)[:4] * 3.0  # orthogonal: cosine 1 with the positive, 0 with every negative
    assert float(train.contrastive_loss(v, v.clone(), 0.1)) / 4 < 1e-3
    assert float(train.contrastive_loss(v, v[[1, 0, 3, 2]], 0.1)) / 4 > 5  # wrong pairing: far from it
    with pytest.raises(common.UserError, match="at least 2 pairs"):
        train.contrastive_loss(v[:1], v[:1], 0.1)


@pytest.mark.parametrize("feature_grad", ["target", "both"])
def test_contrastive_gradient_reaches_only_blocks_up_to_its_layer(feature_grad, tokenizer, rows):
    model = make_tiny_model("llama", tokenizer)
    parts = common.model_parts(model)
    cfg = config("mid-align", tft_weight=0.0, et_layer_used=2, feature_grad=feature_grad)
    assert (cfg["lc"], cfg["et"]) == ("none", "contrastive")
    objective = train.DFTObjective(model, cfg)
    batch = batch_for(tokenizer, cfg, rows)
    states, _ = objective.english_states(parts, batch["en"])
    assert states[2].requires_grad == (feature_grad == "both")  # target: the English branch is a fixed reference
    objective(batch)["loss"].backward()
    grad = lambda module: sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)
    assert grad(parts.blocks[0]) > 0 and grad(parts.blocks[1]) > 0
    assert grad(parts.blocks[2]) == 0 and grad(parts.blocks[3]) == 0 and grad(parts.lm_head) == 0


def test_mid_align_preset_and_alternation(tmp_path, tiny_model_dirs):
    out, log = run(tmp_path, "mid", "--method", "mid-align", "--max-steps", "4", "--alternate",
                   model_dir=tiny_model_dirs["llama"])
    cfg = json.load(open(os.path.join(out, "train_config.json")))
    assert (cfg["et"], cfg["et_layer_used"], cfg["feature_grad"], cfg["contrastive_temperature"]) == (
        "contrastive", 2, "both", 0.1)
    assert [r["phase"] for r in log] == ["task", "align", "task", "align"]
    for r in log:  # each phase logs its own terms and counts
        task = r["phase"] == "task"
        assert (r["loss_tft"] is not None, r["loss_et"] is not None, r["tokens"] > 0) == (task, not task, task)
        assert r["pairs"] == 4


def test_one_pair_per_step_is_refused_for_contrastive(tmp_path, tiny_model_dirs, capsys):
    code, stderr = run_main_in_process(train.main, ["--pairs", PAIRS, "--out", str(tmp_path / "one"), "--model",
                                                    tiny_model_dirs["llama"], "--method", "mid-align", "--batch-size",
                                                    "1", "--max-steps", "1"], capsys)
    assert code == 2 and "raise --batch-size to at least 2" in stderr
    assert not os.path.exists(str(tmp_path / "one" / "train_log.jsonl"))


def test_eval_batches_cover_every_example_once():
    for n, world, size in ((5, 1, 4), (7, 2, 2), (8, 4, 2), (9, 2, 4), (11, 3, 2)):
        plans = train.eval_batches(n, world, size, min_size=2)
        covered = sorted(rank + world * i for rank, plan in enumerate(plans) for s, e in plan for i in range(s, e))
        assert covered == list(range(n))
        # with >= 2 pairs per rank (what main() requires for a contrastive term) every batch holds >= 2
        assert all(e - s >= 2 for plan in plans for s, e in plan), (n, world, size, plans)
    assert train.eval_batches(5, 1, 4, min_size=2) == [[(0, 5)]]  # a lone last pair joins the batch before


def test_contrastive_errors_before_training(tmp_path, tiny_model_dirs, capsys):
    base = ("--pairs", PAIRS, "--model", tiny_model_dirs["llama"], "--method", "mid-align", "--max-steps", "1")
    cases = ((["--eval-pairs", PAIRS, "--eval-limit", "1"], "leave a device fewer than 2"),
             (["--alternate", "--et-weight", "0"], "none with a nonzero weight"))
    out = str(tmp_path / "x")
    for flags, message in cases:
        code, stderr = run_main_in_process(train.main, [*base, "--out", out, *flags], capsys)
        assert code == 2 and message in stderr, stderr[-1500:]
    assert not os.path.exists(os.path.join(out, "train_log.jsonl"))


def test_mid_align_heldout_loss_with_a_lone_last_pair(tmp_path, tiny_model_dirs):
    _, log = run(tmp_path, "midev", "--method", "mid-align", "--max-steps", "1", "--eval-pairs", PAIRS, "--eval-limit",
                 "5", model_dir=tiny_model_dirs["llama"])
    assert log[-1]["eval_loss_et"] > 0 and log[-1]["eval_loss_tft"] > 0
