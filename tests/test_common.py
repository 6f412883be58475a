"""common.py: the logit lens against the models' own logits, block capture, loading errors, I/O."""
import json
import os
import subprocess

import pytest
import torch

import common
from conftest import TINY_CONFIGS, make_tiny_model


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_lens_at_last_block_equals_model_logits(arch, tokenizer):
    """The final norm is applied exactly once: lens(raw h_L) == model logits == lens(HF h_L, normed=True)."""
    model = make_tiny_model(arch, tokenizer)
    parts = common.model_parts(model)
    enc = tokenizer(["你好，世界", "The answer is 42."], return_tensors="pt", padding=True)
    L = parts.num_layers
    with torch.no_grad(), common.capture_blocks(parts, [L]) as raw:
        out = model(**enc, output_hidden_states=True)
    torch.testing.assert_close(common.lens_logits(parts, raw[L]), out.logits)
    torch.testing.assert_close(common.lens_logits(parts, out.hidden_states[L], normed=True), out.logits)
    # HF's intermediate entries are raw residual states: the capture hook sees the same tensors
    with torch.no_grad(), common.capture_blocks(parts, range(1, L)) as raw:
        model(**enc)
    for k in range(1, L):
        torch.testing.assert_close(raw[k], out.hidden_states[k])
    if arch == "gemma2":
        assert parts.softcap == 30.0 and out.logits.abs().max() <= 30.0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_truncated_forward_matches_full_forward(arch, tokenizer):
    model = make_tiny_model(arch, tokenizer)
    parts = common.model_parts(model)
    enc = tokenizer(["a b c d e", "你好"], return_tensors="pt", padding=True)
    with torch.no_grad():
        full = model(**enc, output_hidden_states=True).hidden_states
        for k in (1, 2, 3):
            torch.testing.assert_close(common.run_truncated(parts, k, enc.input_ids, enc.attention_mask), full[k])


def test_truncated_forward_runs_no_block_above(tokenizer):
    model = make_tiny_model("llama", tokenizer)
    parts = common.model_parts(model)
    ran = []
    for k, block in enumerate(parts.blocks, 1):
        block.register_forward_hook(lambda m, a, o, k=k: ran.append(k))
    common.run_truncated(parts, 2, torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long))
    assert ran == [1, 2]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lens_sends_no_gradient_into_head_or_norm(arch, tokenizer):
    model = make_tiny_model(arch, tokenizer)
    parts = common.model_parts(model)
    h = common.run_truncated(parts, 2, torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    common.lens_logits(parts, h).logsumexp(-1).sum().backward()
    grad = parts.lm_head.weight.grad
    if parts.tied:  # the shared matrix is still trained through the input lookup, only on the input rows
        others = torch.ones(grad.shape[0], dtype=torch.bool)
        others[[5, 6, 7]] = False
        assert grad[others].abs().max() == 0 and grad[[5, 6, 7]].abs().max() > 0
    else:
        assert grad is None
    assert all(p.grad is None for p in parts.final_norm.parameters())
    assert all(p.grad is None for p in parts.blocks[2].parameters())
    assert parts.blocks[0].mlp.parameters().__next__().grad is not None
    assert parts.tied == (arch == "gpt2")


def test_capture_rejects_out_of_range_layer(tokenizer):
    parts = common.model_parts(make_tiny_model("llama", tokenizer))
    with pytest.raises(common.UserError, match="out of range"):
        with common.capture_blocks(parts, [5]):
            pass


def test_lens_entropy_curve_shape_and_last_block(tokenizer):
    model = make_tiny_model("llama", tokenizer)
    texts = ["你好，世界", "hello there"]
    curve = common.lens_entropy_curve(model, tokenizer, texts)
    assert len(curve) == 4 and all(0 < e < torch.log(torch.tensor(float(len(tokenizer)))) + 1e-4 for e in curve)
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logp = torch.log_softmax(model(**enc).logits[enc.attention_mask.bool()], -1)
    assert curve[-1] == pytest.approx(float(-(logp.exp() * logp).sum(-1).mean()), rel=1e-5)


def test_unsupported_architecture_is_a_clear_error():
    from transformers import BertConfig
    with pytest.raises(common.UserError, match="unsupported architecture 'bert'.*supported: gpt2, llama"):
        common.check_architecture(BertConfig())


def test_model_loading_errors(tmp_path):
    with pytest.raises(common.UserError, match="model folder not found"):
        common.resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError, match="not a model folder"):
        common.resolve_model(str(tmp_path / "empty"))
    with pytest.raises(common.UserError, match="cannot load model 'no-such-org/no-such-model'"):
        common.resolve_model("no-such-org/no-such-model")


def test_load_local_folder_pads_with_eos(tiny_model_dirs):
    model, tok = common.load_model_and_tokenizer(tiny_model_dirs["llama"], padding_side="left")
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"
    assert common.model_parts(model).num_layers == 4


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "out.jsonl"
    with pytest.raises(TypeError):
        common.write_jsonl(str(path), [{"a": 1}, {"b": object()}])
    assert os.listdir(tmp_path) == []
    common.write_jsonl(str(path), [{"a": "你好"}])
    assert common.read_jsonl(str(path)) == [{"a": "你好"}]


def test_atomic_writes_get_the_mode_a_plain_open_would(tmp_path):
    path = tmp_path / "out.json"
    common.write_json(str(path), {"a": 1})  # mkstemp alone would leave it 0600: unreadable for a shared group
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~common.UMASK


def test_read_jsonl_reports_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": 2\n')
    with pytest.raises(common.UserError, match="line 2"):
        common.read_jsonl(str(path))
    with pytest.raises(common.UserError, match="file not found"):
        common.read_jsonl(str(tmp_path / "missing.jsonl"))
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(common.UserError, match="line 2 is a JSON list, not an object"):
        common.read_jsonl(str(path))
    with pytest.raises(common.UserError, match="is a folder, not a file"):
        common.read_jsonl(str(tmp_path))
    with pytest.raises(common.UserError, match="it is a folder"):
        common.write_json(str(tmp_path), {})


def test_gz_and_xz_transparent_reading(tmp_path):
    import gzip
    import hashlib
    import lzma
    with gzip.open(tmp_path / "x.json.gz", "wt", encoding="utf-8") as f:
        json.dump([1, 2], f)
    assert common.read_json(str(tmp_path / "x.json")) == [1, 2]
    raw = b'{"a": 1}\n{"a": 2}\n'
    (tmp_path / "y.jsonl.xz").write_bytes(lzma.compress(raw))
    assert common.read_jsonl(str(tmp_path / "y.jsonl")) == [{"a": 1}, {"a": 2}]
    # an .xz file hashes as the file it stores (the hash runs recorded before the file was compressed)
    assert common.sha256_file(str(tmp_path / "y.jsonl")) == hashlib.sha256(raw).hexdigest()
    assert common.existing_path(str(tmp_path / "y.jsonl")) == str(tmp_path / "y.jsonl.xz")
    assert common.existing_path(str(tmp_path / "z.jsonl")) is None


def test_language_table_and_prompt():
    assert common.has_script("你好", "zh") and not common.has_script("hello", "zh")
    assert common.has_script("مرحبا", "ar") and common.has_script("Xin chào", "vi")
    with pytest.raises(common.UserError, match="unknown language code 'xx'"):
        common.check_lang("xx")
    x = "Name three colours."
    start, end = common.prompt_span(x)
    assert common.build_prompt(x)[start:end] == x


def test_default_model_smoke():
    """The real offline default model: 30 LLaMA blocks, tied embeddings, the lens reproduces its logits."""
    model, tok = common.load_model_and_tokenizer(common.DEFAULT_MODEL)
    parts = common.model_parts(model)
    assert parts.num_layers == 30 and parts.tied and type(model).__name__ == "LlamaForCausalLM"
    assert tok.decode(tok("你好，世界").input_ids) == "你好，世界"
    enc = tok([common.build_prompt("What is the capital of France?")], return_tensors="pt")
    with torch.no_grad(), common.capture_blocks(parts, [30]) as raw:
        out = model(**enc)
    torch.testing.assert_close(common.lens_logits(parts, raw[30]), out.logits, rtol=1e-4, atol=1e-4)
    assert "Paris" in tok.decode(model.generate(**enc, max_new_tokens=12, do_sample=False)[0])


def test_an_adapter_whose_base_is_gone_is_named_in_the_error(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(dict(base_model_name_or_path=str(tmp_path / "gone"))))
    with pytest.raises(common.UserError, match=r"LoRA adapter .*adapter: its base model '.*gone' \(adapter_config"
                                               r".*model folder not found: .*gone"):
        common.resolve_model(str(adapter))


def test_versions_say_whether_tracked_files_differ_from_the_commit(tmp_path, monkeypatch):
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *a],
                                    check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "stage.py").write_text("x = 1\n")
    git("add", "stage.py")
    git("commit", "-q", "-m", "c")
    monkeypatch.setattr(common, "REPO_DIR", str(tmp_path))
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert common.versions()["git_dirty"] is False
    (tmp_path / "stage.py").write_text("x = 2\n")
    assert common.versions()["git_dirty"] is True
    (tmp_path / ".git" / "index").write_bytes(b"broken")  # git status fails: unknown, not clean
    assert (common.versions()["git_commit"] is not None, common.versions()["git_dirty"]) == (True, None)
    monkeypatch.setattr(common, "REPO_DIR", str(tmp_path / "nowhere"))  # not a checkout: neither is known
    assert (common.versions()["git_commit"], common.versions()["git_dirty"]) == (None, None)


def test_machine_records_what_decides_rounding():
    m = common.versions()["machine"]
    assert m["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert m["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    assert set(m["cpu_flags"]) <= flags and ("avx2" in m["cpu_flags"]) == ("avx2" in flags)
    assert m["native_bf16_cpu"] == common.native_bf16("cpu")
