"""The engine's own decode step for Llama-family models (serve/forward.py): the tokens and the
log-probabilities of transformers' generic forward, on every family it takes, with padded
rows, mixed adapters in slots and adapters attached (as rollouts run them)."""

import pytest
import torch
from conftest import corpus_tokenizer, randomize_adapters
from serving import save_adapters

import lorakit
from lorakit.serve.forward import CachedForward
from lorakit.serve.engine import Engine, Request, SamplingParams
from lorakit.serve.slots import enable_slots
from lorakit.serve.store import AdapterStore


@pytest.fixture(scope="module")
def tokenizer():
    return corpus_tokenizer()


def family(name: str, vocab: int, seed: int = 0):
    """A tiny random model of family ``name``, with grouped key/value heads."""
    import transformers as tf

    shared = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
    configs = {
        # Llama 3's rotary scaling, biases on every projection
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**shared, attention_bias=True, mlp_bias=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}, tie_word_embeddings=False)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**shared, sliding_window=None)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**shared, tie_word_embeddings=True)),  # q/k/v biases
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**shared, head_dim=16)),  # q/k norms, head_dim apart
    }
    torch.manual_seed(seed)
    return configs[name]().eval()


def run(engine: Engine, prompts: list[list[int]], adapters: list[str | None], tokens: int = 8) -> list[Request]:
    params = SamplingParams(max_tokens=tokens, logprobs=3, ignore_eos=True)
    requests = []
    for prompt, adapter in zip(prompts, adapters):
        lease = engine.store.lease(adapter) if adapter is not None else None
        requests.append(Request(list(prompt), adapter, params, lease=lease))
    return engine.generate(requests)


class Counted:
    """The engine's own forward, counting the new tokens of each pass it runs."""

    def __init__(self, engine: Engine) -> None:
        self.step, self.calls = engine.cached_forward, []
        self.buffers, self.fits = self.step.buffers, self.step.fits
        engine.cached_forward = self

    def __call__(self, tokens, *args):
        self.calls.append(tokens.shape[1])
        return self.step(tokens, *args)


def counted(engine: Engine) -> list[int]:
    """New tokens per pass of the engine's own forward: the prompt's, then 1 per decode step."""
    return Counted(engine).calls


def assert_same(fast: list[Request], generic: list[Request]) -> None:
    for a, b in zip(fast, generic):
        assert a.generated == b.generated
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.token == y.token
            # log-probabilities are O(log vocab); float32 rounding of a 2-layer model is ~1e-6
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


def prompts_of(vocab: int, lengths=(5, 2, 9), seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(6, vocab, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3"])
def test_cached_forward_gives_the_generic_forward_tokens_with_adapters_attached(name, tokenizer):
    model = family(name, len(tokenizer))
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8, targets="all-linear"))
    randomize_adapters(model, scale=0.3)
    fast = Engine(model, tokenizer, None)
    generic = Engine(model, tokenizer, None)
    generic.cached_forward = None
    assert fast.cached_forward is not None
    calls = counted(fast)
    prompts = prompts_of(len(tokenizer))  # three lengths: left-padded rows
    expected = run(generic, prompts, [None] * 3)
    assert_same(run(fast, prompts, [None] * 3), expected)
    assert calls == [9] + [1] * 7  # the prefill (three rows padded to 9), then every decode step
    lorakit.set_active(model, [])  # the base: the adapter off changes the tokens, and both paths agree
    base_fast, base_generic = run(fast, prompts, [None] * 3), run(generic, prompts, [None] * 3)
    assert_same(base_fast, base_generic)
    assert [r.generated for r in base_fast] != [r.generated for r in expected]


def test_cached_forward_gives_the_generic_forward_tokens_with_mixed_slots(tiny_lm_dir, tmp_path):
    save_adapters(tiny_lm_dir, tmp_path, [2, 8])
    model = lorakit.load_model(str(tiny_lm_dir))
    enable_slots(model, 2)
    tokenizer = lorakit.load_tokenizer(str(tiny_lm_dir))
    store = AdapterStore(model, tmp_path, 2)
    fast, generic = Engine(model, tokenizer, store), Engine(model, tokenizer, store)
    generic.cached_forward = None
    calls = counted(fast)
    prompts = prompts_of(len(tokenizer), (4, 7, 3, 6))
    adapters = ["a1", None, "a0", "a1"]  # rows on different slots, one on the base
    assert_same(run(fast, prompts, adapters), run(generic, prompts, adapters))
    assert calls == [7] + [1] * 7


def test_a_step_past_a_sliding_window_takes_the_generic_forward(tokenizer):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                              initializer_range=0.2)
    model = tf.MistralForCausalLM(config).eval()
    fast, generic = Engine(model, tokenizer, None), Engine(model, tokenizer, None)
    generic.cached_forward = None
    calls = counted(fast)
    prompt = prompts_of(len(tokenizer), (5,))
    assert_same(run(fast, prompt, [None], tokens=10), run(generic, prompt, [None], tokens=10))
    # 5 prompt columns, then one more per step: steps attending over 6, 7, 8 columns fit the window
    assert calls == [5, 1, 1, 1]
    assert fast.cached_forward.fits(8) and not fast.cached_forward.fits(9)


def test_other_families_take_the_generic_forward(tokenizer):
    from conftest import tiny_gpt2

    assert CachedForward.build(tiny_gpt2()) is None
    assert Engine(tiny_gpt2(), tokenizer, None).cached_forward is None
