"""The engine: continuous batching across adapters gives each request what its adapter
gives alone; sampling, stop strings and EOS."""

import pytest
import torch
from serving import greedy_alone, save_adapters

import lorakit
from lorakit.serve.engine import Engine, Request, SamplingParams
from lorakit.serve.slots import enable_slots
from lorakit.serve.store import AdapterStore


@pytest.fixture(scope="module")
def setup(tiny_lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    save_adapters(tiny_lm_dir, root, [2, 8, 4])
    model = lorakit.load_model(str(tiny_lm_dir))
    enable_slots(model, 3)
    engine = Engine(model, lorakit.load_tokenizer(str(tiny_lm_dir)), AdapterStore(model, root, 3), max_batch=8)
    engine.eos = set()  # a random model: never stop early, so every request runs to max_tokens
    return root, engine


def make(engine, prompt_ids, adapter, **params):
    request = Request(prompt_ids, adapter, SamplingParams(**params))
    request.lease = engine.store.lease(adapter) if adapter else None
    return request


def test_requests_that_join_mid_decode_match_their_adapter_alone(setup, tiny_lm_dir):
    root, engine = setup
    generator = torch.Generator().manual_seed(0)
    names = ["a1", None, "a0", "a2", "a1", "a0", None, "a2"]
    prompts = [torch.randint(6, 300, (n,), generator=generator).tolist() for n in (3, 9, 5, 2, 6, 4, 7, 1)]
    requests = [make(engine, p, n, max_tokens=6) for p, n in zip(prompts, names)]
    for request in requests[:3]:
        engine.submit(request)
    engine.step()
    engine.step()  # the first three are two tokens in when the rest arrive
    for request in requests[3:]:
        engine.submit(request)
    while not all(r.done.is_set() for r in requests):
        engine.step()
    for name, prompt, request in zip(names, prompts, requests):
        expected = greedy_alone(tiny_lm_dir, root / name if name else None, prompt, 6)
        assert request.generated == expected, name
        assert request.finish_reason == "length"
    assert all(entry.users == 0 for entry in engine.store.loaded.values())  # every slot released


def test_seeded_sampling_is_reproducible_and_top_p_narrows_it(setup):
    _, engine = setup
    prompt = [10, 20, 30]
    runs = [engine.generate([make(engine, prompt, "a0", max_tokens=8, temperature=1.0, seed=s)])[0].generated
            for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    greedy = engine.generate([make(engine, prompt, "a0", max_tokens=8)])[0].generated
    nucleus = engine.generate([make(engine, prompt, "a0", max_tokens=8, temperature=1.0, top_p=1e-6, seed=3)])
    assert nucleus[0].generated == greedy  # top_p -> 0 keeps only the most likely token


def test_stop_strings_cut_the_text_and_streaming_never_shows_them(setup):
    _, engine = setup
    prompt = [11, 12, 13]
    full = engine.generate([make(engine, prompt, None, max_tokens=12)])[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    pieces = []
    request = make(engine, prompt, None, max_tokens=12, stop=(stop,))
    request.on_text = pieces.append
    engine.generate([request])
    assert request.finish_reason == "stop"
    assert request.text == full[:full.find(stop)]
    assert "".join(pieces) == request.text


def run_with_eos(engine, length: int, **params):
    """A prompt's first ``length`` greedy tokens, and a request for it run while the third of
    them is the end-of-sequence token."""
    prompt = [7, 8, 9]
    first = engine.generate([make(engine, prompt, None, max_tokens=length)])[0].generated
    engine.eos = {first[2]}
    try:
        return first, engine.generate([make(engine, prompt, None, **params)])[0]
    finally:
        engine.eos = set()


def test_eos_ends_a_request(setup):
    first, request = run_with_eos(setup[1], 4, max_tokens=10)
    assert request.generated == first[:2] and request.finish_reason == "stop"


def test_ignore_eos_runs_a_request_to_max_tokens_through_its_eos(setup):
    first, request = run_with_eos(setup[1], 6, max_tokens=6, ignore_eos=True)
    assert request.generated == first and request.finish_reason == "length"


def test_generate_command_gives_each_prompt_its_adapter_alone(setup, tiny_lm_dir):
    from typer.testing import CliRunner

    from lorakit.cli import app
    from lorakit.serve.engine import build_engine, complete

    root, _ = setup
    result = CliRunner().invoke(app, ["generate", str(tiny_lm_dir), "--adapter", f"x={root / 'a1'}",
                                      "--prompt", "hej", "--prompt", "hej", "--use", "x", "--use", "base",
                                      "--max-tokens", "5"])
    assert result.exit_code == 0, result.output
    for name in ("x", None):
        engine = build_engine(str(tiny_lm_dir), max_adapters=1)
        if name:
            engine.store.add_directory(name, root / "a1")
        text = complete(engine, ["hej"], [name], SamplingParams(max_tokens=5))[0].text
        assert repr(text) in result.output
    assert CliRunner().invoke(app, ["generate", str(tiny_lm_dir), "--prompt", "hej", "--use", "nope"]).exit_code == 2


class Faulty:
    """Wraps engine._forward so that any forward pass including ``slot`` raises."""

    def __init__(self, engine, slot):
        self.engine, self.slot, self.forward = engine, slot, engine._forward

    def __call__(self, ids, mask, positions, slots, cache=None, rows=slice(None), all_logits=False):
        if self.slot in slots:
            raise RuntimeError("this adapter's rows break the forward pass")
        return self.forward(ids, mask, positions, slots, cache, rows, all_logits)


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_a_request_that_breaks_its_batch_fails_alone(setup, tiny_lm_dir, when):
    """Everyone else in the batch gets exactly what their adapter gives alone, and every
    slot is released; the failing request is answered with its error."""
    root, engine = setup
    names = ["a1", None, "a0", "a2"]
    prompts = [[10, 11, 12], [20, 21], [30, 31, 32, 33], [40]]
    requests = [make(engine, p, n, max_tokens=5) for p, n in zip(prompts, names)]
    bad = requests[2]
    if when == "decode":
        for request in requests:
            engine.submit(request)
        engine.step()  # prefilled together, first token out
    engine._forward = Faulty(engine, bad.slot)
    try:
        if when == "prefill":
            for request in requests:
                engine.submit(request)
        while not all(r.done.is_set() for r in requests):
            engine.step()
    finally:
        del engine._forward
    assert bad.finish_reason == "error" and "break the forward pass" in str(bad.error)
    for name, prompt, request in zip(names, prompts, requests):
        if request is not bad:
            assert request.error is None and request.generated == greedy_alone(
                tiny_lm_dir, root / name if name else None, prompt, 5), name
    assert all(entry.users == 0 for entry in engine.store.loaded.values())
    assert not engine.rows and engine.cache is None


def test_every_request_the_engine_holds_is_answered_when_it_stops(setup):
    import threading

    _, engine = setup
    requests = [make(engine, [5, 6, 7], name, max_tokens=50) for name in ("a0", None, "a1")]
    for request in requests[:2]:
        engine.submit(request)
    engine.step()
    engine.submit(requests[2])  # still waiting
    stop = threading.Event()
    stop.set()
    engine.run(stop)
    assert [r.finish_reason for r in requests] == ["cancelled"] * 3
    assert all(r.done.is_set() for r in requests) and not engine.rows and engine.waiting.empty()
    assert all(entry.users == 0 for entry in engine.store.loaded.values())


def test_an_empty_prompt_never_reaches_the_engine():
    with pytest.raises(ValueError, match="at least one prompt token"):
        Request([], None)


def test_a_closed_request_releases_its_lease_once(setup):
    _, engine = setup
    request = make(engine, [1, 2], "a0")
    users = engine.store.loaded["a0"].users
    request.close("cancelled")
    request.close(error=RuntimeError("late"))
    assert engine.store.loaded["a0"].users == users - 1
    assert request.finish_reason == "cancelled" and request.error is None


def test_long_answers_outgrow_the_preallocated_cache_and_stay_exact(setup, tiny_lm_dir):
    """70 tokens: the key/value buffers (32 columns of headroom) are regrown while rows
    join and leave; every answer still equals its adapter alone."""
    from lorakit.serve.kvcache import HEADROOM

    root, engine = setup
    names, prompts, lengths = ["a1", None, "a0"], [[3, 4, 5, 6], [9, 10], [11]], [70, 40, 55]
    assert max(lengths) > 2 * HEADROOM
    requests = [make(engine, p, n, max_tokens=m) for p, n, m in zip(prompts, names, lengths)]
    engine.submit(requests[0])
    for _ in range(20):
        engine.step()
    for request in requests[1:]:
        engine.submit(request)
    while not all(r.done.is_set() for r in requests):
        engine.step()
    for name, prompt, length, request in zip(names, prompts, lengths, requests):
        assert request.generated == greedy_alone(tiny_lm_dir, root / name if name else None, prompt, length), name


def test_combined_and_compressed_adapters_serve_like_any_other(setup, tiny_lm_dir, tmp_path):
    """A cat combination serves what the two adapters give active at once; a compressed one
    what it gives alone."""
    root, engine = setup
    lorakit.save_adapter(lorakit.combine([root / "a0", root / "a2"]).adapter, tmp_path / "mix")
    lorakit.save_adapter(lorakit.compress(root / "a1", rank=3).adapter, tmp_path / "small")
    engine.store.add_directory("mix", tmp_path / "mix")
    engine.store.add_directory("small", tmp_path / "small")
    prompt = [7, 30, 200, 41]
    requests = {name: make(engine, prompt, name, max_tokens=6) for name in ("mix", "small")}
    for request in requests.values():
        engine.submit(request)
    while not all(r.done.is_set() for r in requests.values()):
        engine.step()
    both = lorakit.load_model(str(tiny_lm_dir)).eval()
    lorakit.load_adapter(both, root / "a0", "a0")
    lorakit.load_adapter(both, root / "a2", "a2")
    lorakit.set_active(both, ["a0", "a2"])
    ids = torch.tensor([prompt])
    expected = both.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert requests["mix"].generated == expected
    assert requests["small"].generated == greedy_alone(tiny_lm_dir, tmp_path / "small", prompt, 6)
    assert requests["small"].generated != greedy_alone(tiny_lm_dir, None, prompt, 6)  # the adapter acts
