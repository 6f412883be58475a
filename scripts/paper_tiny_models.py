"""TINY=1 of run_paper.sh: a tiny random LLaMA and a tiny random seq2seq "translator" into Arabic, saved to a folder.

    python scripts/paper_tiny_models.py runs/paper_tiny/tiny_models     # writes lm/ and mt/ inside it

lm/ is the test suite's tiny LLaMA (tests/conftest.py: 4 blocks, hidden 32, the byte-level test tokenizer).
mt/ is a one-layer Marian model on the same tokenizer whose output bias favours the tokens that spell Arabic
letters, so 01_build_pairs.py --translate-model writes Arabic-script text that passes its script filter: it stands in
for NLLB so the MT route of the paper run stays wired end to end. Seeded: the same folder every time.
"""
import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import common  # noqa: E402

ARABIC_BIAS = 8.0  # added to the logits of Arabic-letter tokens: enough that random weights pick them


def main(argv=None):
    import torch
    from transformers import AutoModelForSeq2SeqLM, MarianConfig
    from conftest import make_tiny_model, make_tokenizer
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="where lm/ and mt/ are written")
    out = p.parse_args(argv).folder
    tokenizer = make_tokenizer()
    lm = os.path.join(out, "lm")
    make_tiny_model("llama", tokenizer, seed=0).save_pretrained(lm)
    tokenizer.save_pretrained(lm)
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = MarianConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                          max_position_embeddings=128, init_std=1.0, pad_token_id=eos, eos_token_id=eos,
                          decoder_start_token_id=eos, forced_eos_token_id=None)
    mt = AutoModelForSeq2SeqLM.from_config(config)
    arabic = [i for i in range(len(tokenizer)) if re.search(r"[\u0600-\u06ff]", tokenizer.decode([i]))]
    with torch.no_grad():
        mt.final_logits_bias[0, arabic] += ARABIC_BIAS
    mt.save_pretrained(os.path.join(out, "mt"))
    tokenizer.save_pretrained(os.path.join(out, "mt"))
    print(f"tiny models in {out}: lm/ (LLaMA), mt/ (Marian, {len(arabic)} Arabic-letter tokens favoured)")


if __name__ == "__main__":
    common.run_main(main)
