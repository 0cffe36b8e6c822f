"""Our model equals Hugging Face's Llama, Qwen2 and Qwen3 when it carries the same weights.

Every reference model is built offline from a small random config by ``transformers`` itself, so no
download is needed. Between them the configs have grouped and multi-query heads, tied and untied
heads, rotary bases of 1e4, 5e5 and 1e6, feed-forward widths that are not multiples of 64, Qwen3's
head size that is not ``hidden_size / num_attention_heads``, and every kind of bias.
"""

import json

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from src import generate, llama
from src.attention import KVCache
from src.errors import UserError
from src.generate import generate as generate_ids
from src.llama import config_from_hf, load_llama_state_dict, load_pretrained
from src.model import PRESETS, GPTModel, count_parameters, kv_cache_bytes

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster
DOWNLOAD = llama.download_llama  # the real one, before a test replaces it

COMMON = dict(num_hidden_layers=2, vocab_size=101, max_position_embeddings=48)
HF_CONFIGS = {
    # name: (config class, model class, fields)
    "llama-gqa-tied": (LlamaConfig, LlamaForCausalLM, dict(
        hidden_size=64, intermediate_size=100, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5)),
    "llama-mha-bias": (LlamaConfig, LlamaForCausalLM, dict(
        hidden_size=48, intermediate_size=136, num_attention_heads=3, num_key_value_heads=3,
        attention_bias=True, mlp_bias=True, rope_theta=500000.0)),
    "qwen2-mqa": (Qwen2Config, Qwen2ForCausalLM, dict(
        hidden_size=64, intermediate_size=150, num_attention_heads=4, num_key_value_heads=1,
        tie_word_embeddings=False, rope_theta=1000000.0)),
    "qwen2-gqa-tied": (Qwen2Config, Qwen2ForCausalLM, dict(
        hidden_size=96, intermediate_size=200, num_attention_heads=6, num_key_value_heads=2,
        tie_word_embeddings=True, rope_theta=10000.0)),
    "qwen3-head-dim": (Qwen3Config, Qwen3ForCausalLM, dict(
        hidden_size=64, intermediate_size=90, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen3-mqa": (Qwen3Config, Qwen3ForCausalLM, dict(
        hidden_size=64, intermediate_size=100, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, tie_word_embeddings=False, rope_theta=10000.0)),
}  # fmt: skip


def hf_model(name: str, seed: int = 0, **changes):
    torch.manual_seed(seed)
    config_class, model_class, fields = HF_CONFIGS[name]
    # HF's own eager attention is the reference; weights ten times their default scale, so that
    # attention is far from uniform and a wrong position or head would show in the logits.
    config = config_class(**(COMMON | fields | changes), initializer_range=0.2,
                          attn_implementation="eager")  # fmt: skip
    model = model_class(config).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb them so a mix-up shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def ours_for(ref, **overrides) -> GPTModel:
    model = GPTModel(config_from_hf(ref.config, **overrides)).eval()
    return load_llama_state_dict(model, ref.state_dict())


@pytest.mark.parametrize("attn_impl", ["eager", "fused", "sdpa", "flash"])
@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_match_transformers(name, attn_impl):
    ref = hf_model(name)
    ours = ours_for(ref, attn_impl=attn_impl)
    idx = torch.randint(0, COMMON["vocab_size"], (3, COMMON["max_position_embeddings"]))
    with torch.no_grad():
        expected = ref(idx).logits
        got = ours(idx)
    assert expected.abs().max() > 1.0  # logits large enough for 1e-4 to mean something
    assert (got - expected).abs().max().item() <= 1e-4


def test_the_configs_cover_what_the_issue_asks():
    cfgs = [config_from_hf(hf_model(name).config) for name in HF_CONFIGS]
    assert {c.kv_heads == 1 for c in cfgs} == {True, False}  # multi-query and grouped or not
    assert any(1 < c.kv_heads < c.n_heads for c in cfgs)
    assert {c.tie_weights for c in cfgs} == {True, False}
    assert len({c.rope_theta for c in cfgs}) >= 2
    assert any(c.ff_width % 64 for c in cfgs)
    assert any(c.head_size * c.n_heads != c.emb_dim for c in cfgs)
    assert {(c.qkv_bias, c.bias) for c in cfgs} == {(True, True), (True, False), (False, False)}


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-mqa", "qwen3-head-dim"])
def test_greedy_generation_with_our_kv_cache_matches_transformers(name):
    ref = hf_model(name, seed=3)
    ours = ours_for(ref)
    prompt = torch.tensor([[5, 17, 42, 99, 3]])
    eos = ref.generation_config.eos_token_id  # transformers stops there; so must we
    got = generate_ids(ours, prompt, max_new_tokens=30, context_length=48, eos_id=eos)
    expected = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30,
                            do_sample=False, pad_token_id=0)  # fmt: skip
    assert len(set(got[0, 5:].tolist())) > 3  # a real continuation, not one token repeated
    assert torch.equal(got, expected)


def test_kv_cache_holds_only_the_key_value_heads():
    ours = ours_for(hf_model("qwen2-gqa-tied"))  # 6 query heads share 2 key/value heads
    idx = torch.randint(0, 101, (2, 20))
    cache = [KVCache() for _ in ours.trf_blocks]
    with torch.no_grad():
        pieces = [ours(idx[:, :7], kv_cache=cache)]
        pieces += [ours(idx[:, t : t + 1], kv_cache=cache) for t in range(7, 20)]
        torch.testing.assert_close(torch.cat(pieces, dim=1), ours(idx), rtol=1e-5, atol=1e-5)
    assert cache[0].k.shape == (2, 2, 20, 16)  # (B, n_kv_heads, T, head_size)
    held = sum(c.k.nbytes + c.v.nbytes for c in cache)
    assert held == 2 * kv_cache_bytes(ours.cfg, 20, bytes_per_value=4)  # two sequences, float32


def test_bare_model_state_dict_loads():
    ref = hf_model("llama-gqa-tied")
    base = LlamaModel(ref.config).eval()
    base.load_state_dict(ref.model.state_dict())
    ours = GPTModel(config_from_hf(ref.config)).eval()
    load_llama_state_dict(ours, base.state_dict())  # "layers.0...", no lm_head: tied
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), ref(idx).logits, atol=1e-4, rtol=0)


def test_wrong_config_names_the_first_mismatched_key_and_shape():
    ref = hf_model("qwen2-gqa-tied")
    wrong = GPTModel(config_from_hf(ref.config, n_kv_heads=6))
    with pytest.raises(UserError, match=r"k_proj\.weight.*\(32, 96\).*\(96, 96\)"):
        load_llama_state_dict(wrong, ref.state_dict())
    no_bias = GPTModel(config_from_hf(ref.config, qkv_bias=False))
    with pytest.raises(UserError, match=r"keys our model does not use, first .*k_proj\.bias"):
        load_llama_state_dict(no_bias, ref.state_dict())
    untied = hf_model("qwen3-mqa")  # its own head: a tied model cannot take both matrices
    with pytest.raises(UserError, match=r"an lm_head\.weight of its own"):
        load_llama_state_dict(
            GPTModel(config_from_hf(untied.config, tie_weights=True)), untied.state_dict()
        )
    tied = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}  # as saved
    with pytest.raises(UserError, match=r"no key 'lm_head\.weight'"):
        load_llama_state_dict(GPTModel(config_from_hf(ref.config, tie_weights=False)), tied)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0}), "llama3"),
        (dict(hidden_act="gelu"), "SiLU"),
        (dict(attention_bias=True, mlp_bias=False), "mlp_bias"),
    ],
)  # fmt: skip
def test_what_our_model_cannot_compute_is_refused_by_name(changes, message):
    config = LlamaConfig(**(COMMON | HF_CONFIGS["llama-gqa-tied"][2] | changes))
    with pytest.raises(UserError, match=message):
        config_from_hf(config)
    sliding = Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8)
    with pytest.raises(UserError, match="sliding-window"):
        config_from_hf(sliding)


def test_presets_have_the_published_shapes():
    """Counted on the meta device against transformers' own models built from the published
    config.json fields."""
    published = {
        "smollm2-135m": (LlamaConfig, LlamaForCausalLM, dict(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
            max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)),
        "qwen2.5-0.5b": (Qwen2Config, Qwen2ForCausalLM, dict(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
            max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)),
        "qwen3-0.6b": (Qwen3Config, Qwen3ForCausalLM, dict(
            vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
            max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6)),
    }  # fmt: skip
    for name, (config_class, model_class, fields) in published.items():
        config = config_class(**fields)
        assert config_from_hf(config) == PRESETS[name], name
        with torch.device("meta"):
            theirs, ours = model_class(config), GPTModel(PRESETS[name])
        assert count_parameters(ours) == sum(p.numel() for p in theirs.parameters()), name


# ---------------------------------------------------------------------------------------------
# Loading from disk, as the published models are laid out


def hf_tokenizer(normalize: bool = False):
    """A byte-level BPE trained offline with Hugging Face's tokenizers, as SmolLM2's and Qwen's
    are: special tokens first, then the 256 bytes, then the merges. With ``normalize``, it
    normalises text to NFC first, as Qwen's does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tokenizer.train_from_iterator(
        ["the cat sat on the mat and the dog sat on the log " * 20], trainer
    )
    if normalize:
        tokenizer.normalizer = normalizers.NFC()
    return tokenizer


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A Qwen2 model and its own tokenizer, written as save_pretrained writes them, with the
    weights in shards and an index."""
    tokenizer = hf_tokenizer()
    ref = hf_model("qwen2-gqa-tied", vocab_size=tokenizer.get_vocab_size())
    folder = tmp_path_factory.mktemp("hf-qwen2")
    ref.save_pretrained(folder, max_shard_size="100KB")
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder, ref


def test_folder_from_save_pretrained_gives_hf_logits(hf_folder):
    folder, ref = hf_folder
    assert (folder / "model.safetensors.index.json").is_file()  # the weights are sharded
    ours = load_pretrained(folder)
    assert not ours.training and ours.cfg.tie_weights and ours.cfg.kv_heads == 2
    idx = torch.randint(0, ref.config.vocab_size, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), ref(idx).logits, atol=1e-4, rtol=0)


def test_generate_cli_with_the_models_own_tokenizer_writes_what_hf_writes(hf_folder, capsys):
    folder, ref = hf_folder
    tokenizer = hf_tokenizer()
    prompt = "the dog sat"
    code = generate.main(["--weights", str(folder), "--prompt", prompt, "--temperature", "0",
                          "--max-new-tokens", "8"])  # fmt: skip
    assert code == 0
    ids = tokenizer.encode(prompt).ids
    expected = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()  # fmt: skip
    if 0 in expected:  # <|endoftext|> is id 0: the command stops there
        expected = expected[: expected.index(0)]
    assert len(expected) >= 4, expected  # a real continuation, not an immediate end-of-text
    out = capsys.readouterr()
    assert "note:" not in out.err  # our BPE represents this tokenizer exactly
    assert out.out.rstrip("\n") == prompt + tokenizer.decode(expected)


def test_a_tokenizer_ours_cannot_represent_runs_through_tokenizers(hf_folder, tmp_path, capsys):
    folder, _ = hf_folder
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    hf_tokenizer(normalize=True).save(str(tmp_path / "tokenizer.json"))
    tokenizer = llama.load_tokenizer(tmp_path)
    assert "it normalises text first (NFC)" in capsys.readouterr().err
    text = "the cafe\u0301 sat"  # 'e' + combining accent: NFC makes it one character
    assert tokenizer.encode(text) == hf_tokenizer(normalize=True).encode(text).ids
    assert tokenizer.decode(tokenizer.encode("the cat")) == "the cat"


def test_config_json_of_the_published_kind_reads(tmp_path):
    # The published config.json files name rope_theta at the top and rope_scaling null.
    fields = dict(model_type="llama", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=101, rms_norm_eps=1e-5,
                  max_position_embeddings=48, rope_theta=100000, rope_scaling=None,
                  tie_word_embeddings=True, hidden_act="silu")  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(fields))
    cfg = config_from_hf(llama.read_config(tmp_path / "config.json", {"model_type": None}))
    assert (cfg.rope_theta, cfg.kv_heads, cfg.tie_weights) == (100000.0, 2, True)


def test_missing_folder_or_weights_is_one_error(tmp_path):
    with pytest.raises(UserError, match="no such folder; expected one of smollm2-135m"):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(UserError, match="holds no config.json"):
        load_pretrained(tmp_path)


def test_generate_cli_offline_is_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    # The path a machine without network takes, without waiting for DNS and retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(llama, "download_llama", lambda name: DOWNLOAD(name, tmp_path))
    assert generate.main(["--pretrained", "smollm2-135m", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not download smollm2-135m")
    assert "https://huggingface.co/HuggingFaceTB/SmolLM2-135M" in err[0] and "--weights" in err[0]
