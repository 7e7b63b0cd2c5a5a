"""The LLM loader, generation and chat formats against transformers as the oracle."""
import json

import pytest
import torch
from conftest import FAMILIES, build_hf

import model
import multimodal
import encoders
from model import load_llm
from tokenizer import load_tokenizer


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_transformers(hf_models, family):
    folder, hf = hf_models[family]
    llm = load_llm(folder, dtype=torch.float32)
    ids = torch.randint(0, llm.config.vocab_size, (2, 48))  # longer than llama3's original context of 32
    with torch.no_grad():
        ours = llm(ids)
        ref = hf(input_ids=ids).logits
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_file_dtype_is_kept_unless_asked(hf_models):
    folder, _ = hf_models["llama_linear_bf16"]
    assert load_llm(folder).lm_head.weight.dtype == torch.bfloat16
    assert load_llm(folder, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_sharded_checkpoint_is_read(hf_models, tmp_path):
    """Every tensor of a sharded folder is read from its shard; a shard the index names but the folder lacks is
    an error naming it."""
    import shutil
    folder, hf = hf_models["mistral"]
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    ours = load_llm(folder).state_dict()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(ours[name], tensor), name
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / shards[-1].name).unlink()
    with pytest.raises(FileNotFoundError, match=f"names shards that are not in the folder.*{shards[-1].name}"):
        load_llm(broken)


def test_padded_batch_matches_single_rows(hf_models):
    """Right padding with plain causal attention leaves every real token's logits unchanged."""
    folder, _ = hf_models["qwen2"]
    llm = load_llm(folder)
    a, b = torch.randint(0, 300, (1, 20)), torch.randint(0, 300, (1, 12))
    batch = torch.zeros(2, 20, dtype=torch.long)
    batch[0], batch[1, :12] = a[0], b[0]
    with torch.no_grad():
        out = llm(batch)
        torch.testing.assert_close(out[1, :12], llm(b)[0], atol=1e-5, rtol=1e-5)


def test_errors_name_the_file_and_key(tmp_path, hf_models):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llm(tmp_path)
    folder, _ = hf_models["qwen2"]
    cfg = json.loads((folder / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        load_llm(bad)

    from safetensors.torch import load_file, save_file
    state = load_file(str(folder / "model.safetensors"))
    (bad / "config.json").write_text(json.dumps(cfg))
    missing = "model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in state.items() if k != missing}, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="missing tensors.*model.layers.1.mlp.up_proj.weight"):
        load_llm(bad)
    q = "model.layers.0.self_attn.q_proj.weight"
    state[q] = state[q][:, :10].contiguous()
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="wrong shapes.*model.layers.0.self_attn.q_proj.weight"):
        load_llm(bad)


def test_cached_greedy_equals_uncached_argmax(hf_models):
    folder, _ = hf_models["llama"]
    llm = load_llm(folder)
    prompt = torch.randint(0, 300, (9,)).tolist()
    out = llm.generate([prompt], max_new_tokens=12)[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(llm(torch.tensor([ids]))[0, -1].argmax().item())
    assert out == ids[len(prompt):]


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_batched_generation_equals_one_by_one(hf_models, family):
    folder, _ = hf_models[family]
    llm = load_llm(folder)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (5, 11, 8)]
    batched = llm.generate(prompts, max_new_tokens=10)
    assert batched == [llm.generate([p], max_new_tokens=10)[0] for p in prompts]


def test_sampling_respects_top_k_and_stops(hf_models):
    folder, _ = hf_models["qwen2"]
    llm = load_llm(folder)
    prompt = [1, 2, 3, 4]
    g = torch.Generator().manual_seed(0)
    greedy = llm.generate([prompt], max_new_tokens=6)[0]
    assert llm.generate([prompt], max_new_tokens=6, temperature=1.0, top_k=1, generator=g)[0] == greedy
    assert llm.generate([prompt], max_new_tokens=6, stop_ids=(greedy[0],))[0] == []
    logits = torch.tensor([[0.0, 10.0, 9.0, -5.0]])
    draws = {model.sample(logits, 1.0, 0, 0.5, g).item() for _ in range(50)}
    assert draws == {1}  # top-p 0.5 keeps only the most likely token


def test_sampling_draws_each_token_with_its_probability():
    """The Gumbel-max draw: over 20,000 draws each token's share is its softmax probability at the temperature,
    within 0.015; top-k 2 leaves the two most likely, renormalised."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(20000, 4)
    for temperature, top_k in ((1.0, 0), (0.5, 0), (1.0, 2)):
        counts = torch.bincount(model.sample(logits, temperature, top_k, 1.0, g), minlength=4) / 20000
        kept = logits[0] if top_k == 0 else logits[0].masked_fill(logits[0] < 1.0, float("-inf"))
        assert torch.allclose(counts, (kept / temperature).softmax(-1), atol=0.015), (temperature, top_k, counts)


# Official chat templates (from each family's tokenizer_config.json), rendered by transformers as the oracle.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if (message.role == \"user\") or "
    "(message.role == \"system\" and not loop.first) or (message.role == \"assistant\") %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- set user_messages = loop_messages | selectattr('role', 'equalto', 'user') | list %}{{- bos_token }}"
    "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if message == user_messages[-1] and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}{%- else %}"
    "{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token}}{%- endif %}{%- endfor %}")
QWEN3_TEMPLATE = (  # the non-tool, non-reasoning path of Qwen3's template
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}{%- if message.role == 'user' %}"
    "{%- set ns.last_query_index = index %}{%- break %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- if loop.index0 > ns.last_query_index and loop.last %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n\\n</think>\\n\\n' + message.content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}{%- endif %}")

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is shown in the picture?"},
    {"role": "assistant", "content": "A red circle on the left."},
    {"role": "user", "content": "Count the beeps."},
    {"role": "assistant", "content": "Three short beeps."},
]


@pytest.mark.parametrize("template,bos,eos", [(QWEN25_TEMPLATE, None, "<|im_end|>"),
                                              (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
                                              (MISTRAL_TEMPLATE, "<s>", "</s>"), (QWEN3_TEMPLATE, None, "<|im_end|>")])
@pytest.mark.parametrize("system", [True, False])
def test_chat_format_equals_official_template(tmp_path, tokenizer_dir, template, bos, eos, system):
    import shutil

    from transformers import PreTrainedTokenizerFast
    shutil.copy(tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": bos, "eos_token": eos, "pad_token": "<|endoftext|>"}))
    tok = load_tokenizer(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token=bos, eos_token=eos,
                                 chat_template=template)
    msgs = CONVERSATION if system else CONVERSATION[1:]
    for messages, gen in ((msgs, False), (msgs[:-1], True)):
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert tok.chat_format.render(messages, gen)[0] == text
        ids, is_reply = tok.render(messages, gen)
        assert ids == hf(text, add_special_tokens=False)["input_ids"]
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        labelled = tok.decode([i for i, r in zip(ids, is_reply) if r])
        assert labelled.replace(" ", "") == "".join(replies).replace(" ", "")
        # the end-of-turn token of every reply is labelled, nothing of the prompts is
        assert sum(1 for i, r in zip(ids, is_reply) if r and i == tok.end_of_turn_id) == len(replies)


def test_multimodal_generation_equals_transformers(hf_models):
    """MultimodalLM.generate (media features spliced into the prompts, left padding, KV cache) answers with the
    greedy tokens of transformers' generate on the same input embeddings, prompt by prompt."""
    import data
    folder, hf = hf_models["llama"]
    llm = load_llm(folder)
    H = llm.config.hidden_size
    small = encoders.EncoderConfig(16, 1, 2)
    torch.manual_seed(0)
    aligner = encoders.Aligner(encoders.AlignerConfig(dim=16, image=small, audio=small, image_size=16,
                                                      patch_size=8)).eval()
    projectors = torch.nn.ModuleDict({m: multimodal.Projector(16, 32, H, 3) for m in multimodal.MODALITIES})
    mm = multimodal.MultimodalLM(llm, aligner, projectors, {"image": 5, "audio": 6})
    image = data.Media(torch.arange(2, 5), raw=torch.randn(1, 3, 16, 16))
    audio = data.Media(torch.arange(1, 4), raw=torch.randn(1, 16000) * 0.1)
    items = [data.Item("a", [10, 11, 5, 5, 5, 12, 13], [-100] * 7, {"image": image}),
             data.Item("b", [20, 6, 6, 6, 21, 22, 23, 24, 25, 26, 27], [-100] * 11, {"audio": audio})]
    batch = data.collate(items, pad_id=0)
    ours = mm.generate(batch, max_new_tokens=8)
    x = mm.embed(batch)
    hf.generation_config.eos_token_id = None  # ours runs without stop tokens here
    for b, n in enumerate(batch.lengths):
        ref = hf.generate(inputs_embeds=x[b:b + 1, :n], attention_mask=torch.ones(1, n, dtype=torch.long),
                          max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert ours[b] == ref[0].tolist()


def test_sliding_window_equals_transformers(tokenizer_dir, tmp_path):
    """Mistral's sliding window: each token attends to the last `sliding_window` tokens, in training and in
    generation with the KV cache."""
    hf = build_hf("mistral", tmp_path, tokenizer_dir, sliding_window=6)
    llm = load_llm(tmp_path)
    assert llm.config.sliding_window == 6
    ids = torch.randint(0, llm.config.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(llm(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    prompt = ids[0, :9].tolist()
    hf.generation_config.eos_token_id = None
    ref = hf.generate(input_ids=ids[:1, :9], attention_mask=torch.ones(1, 9, dtype=torch.long), max_new_tokens=6,
                      do_sample=False, pad_token_id=0)[0, 9:].tolist()
    assert llm.generate([prompt], max_new_tokens=6)[0] == ref


def test_save_llm_shards_as_transformers_does(hf_models, tmp_path):
    """A folder larger than one shard is written as model-0000i-of-0000n.safetensors with its index; transformers
    and our loader both read it back."""
    from transformers import AutoModelForCausalLM
    folder, hf = hf_models["qwen2"]
    llm = load_llm(folder)
    model.save_llm(llm, tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and index["metadata"]["total_size"] > 100_000
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        ref = llm(ids)
        torch.testing.assert_close(load_llm(tmp_path / "sharded")(ids), ref, atol=0, rtol=0)
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
        torch.testing.assert_close(again(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
