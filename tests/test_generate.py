"""generate.py: loading a run or an export folder, one question, chat, predictions with metrics, the export folder
loaded by transformers and peft, and bad input."""
import copy
import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, rows

import decode
import generate
import lora


def cli(*args, stdin=None, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)], cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_export_loads_in_transformers_and_peft(trained_run, tmp_path, monkeypatch):
    """merged/ gives our merged logits in transformers, adapter/ gives them in peft on the base from any working
    directory, and load_run on the export folder gives the run's own model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out = tmp_path / "export"
    assert cli("--run", trained_run, "--export", out).returncode == 0
    model, tokenizer, cfg = generate.load_run(trained_run)
    assert any(m.lora_B.weight.abs().max() > 0 for m in lora.lora_modules(model.llm).values())  # trained adapters
    ids = torch.randint(0, model.llm.config.vocab_size, (2, 24))
    with torch.no_grad():
        ours = model.llm(ids)
        # fp32 sums in another order (merged weights, another attention kernel): errors scale with the logits
        tol = dict(atol=2e-5 * ours.abs().max().item(), rtol=1e-4)
        hf = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        torch.testing.assert_close(hf(input_ids=ids).logits, ours, **tol)
        monkeypatch.chdir(tmp_path)  # the adapter names its base by an absolute path
        base = AutoModelForCausalLM.from_pretrained(json.loads((out / "adapter" / "adapter_config.json").read_text())
                                                    ["base_model_name_or_path"])
        peft = PeftModel.from_pretrained(base, out / "adapter").eval()
        torch.testing.assert_close(peft(input_ids=ids).logits, ours, **tol)
        exported, _, _ = generate.load_run(out)
        torch.testing.assert_close(exported.llm(ids), ours, **tol)
        assert all(torch.equal(a, b) for a, b in zip(exported.projectors.state_dict().values(),
                                                     model.projectors.state_dict().values()))
    for f in out.rglob("*"):
        assert f.is_dir() or f.stat().st_mode & 0o777 == 0o644, f
    assert (out / "merged" / "tokenizer.json").is_file() and (out / "mmlora.json").is_file()


def test_predict_reproduces_the_eval_accuracy_and_resumes(trained_run, demo_dir, tmp_path):
    pred = tmp_path / "pred.jsonl"
    r = cli("--run", trained_run, "--predict", demo_dir / "data" / "val.jsonl", "--out", pred, "--batch_size", 4)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in pred.read_text().splitlines()]
    assert len(lines) == 12 and {"id", "prediction", "reference", "media"} <= set(lines[0])
    metrics = json.loads((tmp_path / "pred.metrics.json").read_text())
    assert metrics["exact_match"] == rows(trained_run, "val")[-1]["accuracy"]
    assert sum(v["samples"] for v in metrics["by_mix"].values()) == 12 and "exact match" in r.stdout
    pred.write_text("".join(json.dumps(x) + "\n" for x in lines[:5]))  # an interrupted run
    assert cli("--run", trained_run, "--predict", demo_dir / "data" / "val.jsonl", "--out", pred,
               "--resume").returncode == 0
    ids = [json.loads(x)["id"] for x in pred.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 12


def test_a_question_with_media_and_a_chat(trained_run, demo_dir):
    media = demo_dir / "data" / "media"
    image = next(media.glob("val-*.npy"))
    audio = next(media.glob("val-*.wav"))
    r = cli("--run", trained_run, "--image", image, "--audio", audio, "What is shown? <image> And heard? <audio>",
            "--max_new_tokens", 4)
    assert r.returncode == 0 and r.stdout.endswith("\n"), r.stderr  # the answer (this short run's may be empty)
    r = cli("--run", trained_run, "--chat", "--max_new_tokens", 4,
            stdin=f"/image {image}\nWhat colour is the shape?\n/audio {audio}\nHow many beeps?\n/reset\nHi\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 3  # one answer per question


def test_greedy_answer_equals_the_model_s_generate(trained_run, demo_dir):
    """The CLI's prompt is the one training's evaluation builds for the same question."""
    import data
    model, tokenizer, cfg = generate.load_run(trained_run)
    ds = data.ConversationDataset(demo_dir / "data" / "val.jsonl", tokenizer, model.aligner.config,
                                  cfg.model.tokens_per_media, cfg.data.max_len)
    i = next(i for i, ex in enumerate(ds.examples) if ex.media["image"])
    item, _ = ds.prompt(i)
    ex = ds.examples[i]
    question = ex.messages[0]["content"].replace("<image>\n", "")
    ours = generate.prompt_item([{"role": "user", "content": generate.user_turn(question, [("image", "x")])}],
                                [("image", str(ex.media["image"][0]))], tokenizer, model, cfg, 8)
    assert ours.input_ids == item.input_ids and torch.equal(ours.media["image"].raw, item.media["image"].raw)


@pytest.mark.parametrize("case", ["no checkpoint", "does not fit", "missing medium", "more media", "too long",
                                  "not a run"])
def test_bad_input_is_one_line_and_exit_code_2(trained_run, demo_dir, tmp_path, capsys, case):
    args = ["--run", trained_run, "What?"]
    image = next((demo_dir / "data" / "media").glob("val-*.npy"))
    if case == "no checkpoint":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "config.json").write_text((trained_run / "config.json").read_text())
        args, expect = ["--run", tmp_path / "run", "What?"], "no checkpoint there"
    elif case == "does not fit":
        cfg = json.loads((trained_run / "config.json").read_text())
        cfg["lora"]["rank"] = 2
        run = tmp_path / "run"
        run.mkdir()
        (run / "config.json").write_text(json.dumps(cfg))
        args, expect = ["--run", run, "--checkpoint", trained_run / "checkpoints" / "best", "What?"], \
            "does not fit this run"
    elif case == "missing medium":
        args, expect = args + ["--image", tmp_path / "nope.png"], "nope.png: image file not found"
    elif case == "more media":
        args, expect = ["--run", trained_run, "--image", image, "--image", image, "Look: <image>"], \
            "places 1 <image> but 2 image file(s) are attached"
    elif case == "too long":
        args, expect = args + ["--max_new_tokens", 100000], "more than the model's context"
    else:
        args, expect = ["--run", tmp_path, "What?"], "neither a run folder"
    with pytest.raises(SystemExit) as e:  # the CLI's own entry point, in this process
        generate.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and expect in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_token_f1_and_mixes():
    assert generate.token_f1("a red circle", "A red  square") == pytest.approx(2 / 3)
    assert generate.token_f1("", "") == 1.0 and generate.token_f1("x", "") == 0.0
    m = generate.prediction_metrics([{"prediction": "Red ", "reference": "red", "media": {"image": ["a"]}},
                                     {"prediction": "two", "reference": "one", "media": {"image": [], "audio": []}}])
    assert m["exact_match"] == 0.5 and m["by_mix"]["image"]["exact_match"] == 1.0 and m["by_mix"]["text"]["f1"] == 0
    assert copy.deepcopy(m) == json.loads(json.dumps(m))


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_the_recorded_decoders_steps_equal_the_plain_ones(hf_models, family):
    """generate.py's decoder for --compile (LoRA merged, q/k/v and gate/up as one matmul each, whole cache, slot and
    positions on the device, several steps per call), run eagerly: the tokens of LLM.generate's own steps with the
    adapters unmerged, for left-padded prompts of different lengths, greedy, streamed, and sampled (the same
    generator state gives the same draws)."""
    from model import load_llm
    llm = load_llm(hf_models[family][0])
    lora.apply_lora(llm, rank=4, alpha=8.0)
    for m in lora.lora_modules(llm).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (5, 11, 8)]
    greedy = llm.generate(prompts, 10)
    sampled = llm.generate(prompts, 9, temperature=0.8, top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(3))
    decoder = decode.GraphDecoder(llm, steps=4, bucket=16, record=False)
    assert all(m.merged for m in lora.lora_modules(llm).values())
    assert llm.generate(prompts, 10, decoder=decoder) == greedy
    rows = decoder.batch_rows
    decoder.batch_rows = lambda B: B + 5  # as recorded, where rows are rounded up: copies of the last prompt
    assert llm.generate(prompts, 10, decoder=decoder) == greedy
    decoder.batch_rows = rows
    streamed = []
    assert llm.generate(prompts[:1], 7, decoder=decoder, on_token=streamed.append) == [[t[0] for t in streamed]]
    assert streamed[:7] == [[t] for t in greedy[0][:7]]
    assert llm.generate(prompts, 9, temperature=0.8, top_k=50, top_p=0.9, decoder=decoder,
                        generator=torch.Generator().manual_seed(3)) == sampled


def test_continuous_batching_gives_each_prompt_its_own_answer(hf_models):
    """`GraphDecoder.stream` (the decoder of --predict and of training's evaluation, run eagerly): prompts of
    different lengths in several batches, more of them than rows, so that finished rows take new prompts; rows
    that stop early and rows that run to max_new_tokens; a longer prompt after shorter ones (a cache of its own);
    rows capped by the cache slots; one new token. Each answer equals LLM.generate's for that prompt alone, no
    more rows run than asked for, and a decode call runs only the rows up to the highest running one."""
    from model import load_llm, sample
    llm = load_llm(hf_models["qwen3"][0])
    torch.manual_seed(0)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (30, 27, 21, 19, 14, 12, 9, 7, 5, 3, 2, 40)]
    alone = [llm.generate([p], 10)[0] for p in prompts]
    stops = (alone[1][2], alone[4][5])  # rows that stop early (at least these two)
    expected = [llm.generate([p], 10, stop_ids=stops)[0] for p in prompts]
    assert sum(len(e) < 10 for e in expected) >= 2 and sum(len(e) == 10 for e in expected) >= 2
    decoder = decode.GraphDecoder(llm, steps=4, record=False)
    admitted = []
    admit = decoder.admit
    decoder.admit = lambda state, rows, items, pick: admitted.append(
        (*state.caches[0].k.shape[::2], rows)) or admit(state, rows, items, pick)
    # caches (rows, slots): the first prompts' longest (30: 32 wide) + 12 decode slots, rounded up to 16, then one
    # for the last prompt (40: 48 + 12 -> 64); or with all prompts waiting at once, one for the 40, 2 rows of 64
    for n_rows, slots, caches in ((4, None, {(4, 48), (4, 64)}), (3, None, {(3, 48), (3, 64)}), (16, 150, {(2, 64)})):
        admitted.clear()
        batches = iter([[(i, prompts[i], None) for i in range(s, min(s + 5, len(prompts)))]
                        for s in range(0, len(prompts), 5)])
        got = {}
        for finished in decoder.stream(batches, 10, functools.partial(sample), stops, n_rows, slots, bucket=16):
            assert all(k not in got for k, _ in finished)
            got.update(finished)
        assert [got[i] for i in range(len(prompts))] == expected, (n_rows, slots)
        assert len(admitted) > 2 and all(r < R for R, _, at in admitted for r in at)  # rows freed, taken again
        scattered = [at != list(range(at[0], at[0] + len(at))) for *_, at in admitted]
        assert not scattered[0] and (any(scattered) or n_rows != 4)  # rows side by side, and rows apart
        assert {(R, S) for R, S, _ in admitted} == caches
    one = list(decoder.stream(iter([[(0, prompts[0], None)]]), 1, functools.partial(sample), (), 4))
    assert one == [[(0, alone[0][:1])]]
    # three prompts in 16 rows: a decode call runs rows 0..3 (3 rounded up to a power of two), then fewer
    calls, run = [], decoder.run
    decoder.run = lambda state, pick: calls.append(len(state.slot)) or run(state, pick)
    got = {}
    for finished in decoder.stream(iter([[(i, prompts[i], None) for i in range(3)]]), 10, functools.partial(sample),
                                   stops, 16):
        got.update(finished)
    assert [got[i] for i in range(3)] == expected[:3]
    assert calls[0] == 4 and set(calls) <= {1, 2, 4}, calls
    # whatever a row's last request left in its cache (here NaN everywhere) does not reach the next one's answer
    for state in decoder.states.values():
        for c in state.caches:
            c.k.fill_(float("nan")), c.v.fill_(float("nan"))
    got = {}
    for finished in decoder.stream(iter([[(i, prompts[i], None) for i in range(3)]]), 10, functools.partial(sample),
                                   stops, 16):
        got.update(finished)
    assert [got[i] for i in range(3)] == expected[:3]


def test_a_servers_decoder_records_every_row_count_before_its_first_request(hf_models):
    """`GraphDecoder.record_for_serving` (serve.py, before its first request) records a decode call for each row
    count and for greedy and sampling rows alike, so that requests of both kinds record none. On the CPU a
    "recording" here replays the eager steps it was made on: the bookkeeping is what is checked (the recorded
    path itself: tests/test_cuda.py)."""
    import types

    from model import load_llm
    llm = load_llm(hf_models["qwen3"][0])
    torch.manual_seed(0)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (30, 21, 9, 5, 3)]
    expected = [llm.generate([p], 10)[0] for p in prompts]
    decoder = decode.GraphDecoder(llm, steps=4, record=False)
    decoder.record = True
    decoder.capture = lambda state, pick: types.SimpleNamespace(replay=functools.partial(decoder.run, state, pick))
    settings = decode.RowSettings(4, "cpu")
    pick = functools.partial(decode.sample_rows, rows=settings)
    with torch.no_grad():
        decoder.record_for_serving(4, None, 48, 10, pick, settings)
        recorded = dict(decoder.graphs)
        assert sorted((k[2], k[-1]) for k in recorded) == [(n, s) for n in (1, 2, 4) for s in (False, True)]
        for i in range(len(prompts)):  # greedy rows, and one that samples among them
            settings.wanted[i] = (0, 0.7 if i == 2 else 0.0, 1.0, i)
        got = {}
        for finished in decoder.stream(iter([[(i, p, None) for i, p in enumerate(prompts)]]), 10, pick, (), 4,
                                       prompt_tokens=48, settings=settings):
            got.update(finished)
    assert decoder.graphs == recorded and len(got[2]) == 10
    assert [got[i] for i in range(len(prompts)) if i != 2] == [e for i, e in enumerate(expected) if i != 2]


def test_length_batches_keep_their_caps_and_workers_give_the_same_answers(trained_run, demo_dir, tmp_path):
    """--predict's batches: every sample once, longest first, none over its rows or cache slots; DataLoader workers
    decoding the media give the answers of the main process decoding them, and of one sample at a time."""
    import data
    model, tokenizer, cfg = generate.load_run(trained_run)
    ds = data.ConversationDataset(demo_dir / "data" / "val.jsonl", tokenizer, model.aligner.config,
                                  cfg.model.tokens_per_media, cfg.data.max_len)
    todo = list(range(len(ds)))
    batches = data.length_batches(ds, todo, 5, 300, 8)
    assert sorted(i for b in batches for i in b) == todo
    lengths = [len(ds.examples[i].input_ids) for b in batches for i in b]
    assert lengths == sorted(lengths, reverse=True)
    assert all(len(b) <= 5 and len(b) * (len(ds.examples[b[0]].input_ids) + 8) <= 300 for b in batches if len(b) > 1)
    # each batch decoded in parts of 2 by two workers: the same samples and prompts as one batch in this process
    whole, parted = (list(data.prompt_batches(ds, todo, 5, 300, 8, tokenizer.pad_id, torch.device("cpu"), w, p))
                     for w, p in ((0, None), (2, 2)))
    assert [b[:3] for b in whole] == [b[:3] for b in parted] and len(whole) == len(batches)
    assert all(torch.equal(a[3].input_ids, b[3].input_ids) and torch.equal(a[3].media["image"].raw,
               b[3].media["image"].raw) for a, b in zip(whole, parted) if "image" in a[3].media)
    answers = {}
    for workers, n_rows in ((0, 5), (2, 5), (0, 1)):
        out = tmp_path / f"p{workers}-{n_rows}.jsonl"
        generate.predict(model, tokenizer, cfg, str(demo_dir / "data" / "val.jsonl"), out, n_rows, 8, {}, False,
                         batch_tokens=300, workers=workers)
        answers[workers, n_rows] = {r["id"]: r["prediction"] for r in map(json.loads, out.read_text().splitlines())}
    assert answers[0, 5] == answers[2, 5] == answers[0, 1] and len(answers[0, 1]) == 12
