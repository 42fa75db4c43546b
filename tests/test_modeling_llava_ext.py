"""Parity with transformers' LlavaForConditionalGeneration on the same weights, and what the reference lacks."""

import copy
import json
import warnings

import pytest
import torch
from conftest import IMAGE_SIZE, IMAGE_TOKEN_ID, NUM_PATCHES, PAD_ID, tiny_llava_config
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, CompileConfig, LlavaForConditionalGeneration

from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration
from llava_ext.modeling_llava_ext import compiled_for, drop_foreign_compiled_call

PARITY_CASES = {
    "clip-llama-layer-2-default": dict(vision="clip", text="llama", vision_feature_layer=-2),
    "clip-llama-layers-3-1": dict(vision="clip", text="llama", vision_feature_layer=[-3, -1]),
    "clip-mistral-layer-1-full": dict(
        vision="clip", text="mistral", vision_feature_layer=-1, vision_feature_select_strategy="full"
    ),
    "siglip-qwen2-layer-1-full": dict(
        vision="siglip", text="qwen2", vision_feature_layer=-1, vision_feature_select_strategy="full"
    ),
}


def build_pair(attn_implementation="eager", **case):
    """The reference and ours from one random tiny config, ours holding the reference's weights."""
    ref_config = tiny_llava_config(**case)
    reference = LlavaForConditionalGeneration._from_config(ref_config, attn_implementation=attn_implementation)
    ours = LlavaExtForConditionalGeneration._from_config(
        LlavaExtConfig(**ref_config.to_dict()), attn_implementation=attn_implementation
    )
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=True)
    assert not missing and not unexpected
    return reference.eval(), ours.eval()


def tokens_per_image(config) -> int:
    has_cls = config.vision_config.model_type == "clip_vision_model"
    return NUM_PATCHES + int(has_cls) - int(config.vision_feature_select_strategy == "default")


def left_padded_batch(config, num_images=(1, 2)):
    """Two samples, the first left-padded; sample i holds num_images[i] images."""
    per_image = tokens_per_image(config)
    rows = []
    for count in num_images:
        row = [1, 40]
        for _ in range(count):
            row += [IMAGE_TOKEN_ID] * per_image + [50, 51]
        rows.append(row + [60, 61, 62])
    width = max(map(len, rows)) + 3
    input_ids = torch.tensor([[PAD_ID] * (width - len(row)) + row for row in rows])
    attention_mask = (input_ids != PAD_ID).long()
    pixel_values = torch.randn(sum(num_images), 3, IMAGE_SIZE, IMAGE_SIZE)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=labels)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case", PARITY_CASES.values(), ids=PARITY_CASES.keys())
def test_parity_with_reference(case, attn_implementation):
    reference, ours = build_pair(attn_implementation, **case)
    assert ours.model.vision_tower.config._attn_implementation == attn_implementation
    batch = left_padded_batch(reference.config)
    with torch.no_grad():
        expected = reference(**batch)
        got = ours(**batch)
    assert (expected.logits - got.logits).abs().max().item() <= 1e-4
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-5)

    generate_inputs = {key: value for key, value in batch.items() if key != "labels"}
    expected_tokens = reference.generate(**generate_inputs, max_new_tokens=6, do_sample=False)
    got_tokens = ours.generate(**generate_inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(expected_tokens, got_tokens)


def count_layer_calls(tower):
    calls = []
    for index, layer in enumerate(tower.encoder.layers):
        layer.register_forward_hook(lambda module, args, output, index=index: calls.append(index))
    return calls


def test_vision_tower_runs_only_the_layers_it_reads():
    _, ours = build_pair(vision="clip", text="llama", vision_feature_layer=-2)  # 3 layers: state -2 is layer 2's
    calls = count_layer_calls(ours.model.vision_tower)
    ours.get_image_features(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert calls == [0, 1]


def test_vision_feature_layer_zero_matches_reference_with_hidden_states():
    reference, ours = build_pair(vision="clip", text="llama", vision_feature_layer=0)
    calls = count_layer_calls(ours.model.vision_tower)
    batch = left_padded_batch(reference.config)
    with torch.no_grad():
        # transformers 5.23's LLaVA crashes on layer 0 unless every hidden state is requested
        ref_features = reference.model.get_image_features(
            batch["pixel_values"], vision_feature_layer=0, vision_feature_select_strategy="default",
            output_hidden_states=True,
        ).pooler_output
        our_features = ours.get_image_features(batch["pixel_values"]).pooler_output
        for expected, got in zip(ref_features, our_features, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

        embeds = reference.get_input_embeddings()(batch["input_ids"])
        image_mask = (batch["input_ids"] == IMAGE_TOKEN_ID).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(image_mask, torch.cat(ref_features))
        expected = reference(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        got = ours(**batch).logits
    assert calls == []  # the embedding output needs no encoder layer
    assert (expected - got).abs().max().item() <= 1e-4


def test_pixel_values_reach_the_vision_tower_only_on_prefill():
    _, ours = build_pair(vision="clip", text="llama")
    calls = []
    ours.model.vision_tower.embeddings.register_forward_hook(lambda *args: calls.append(1))
    batch = left_padded_batch(ours.config)
    batch.pop("labels")
    ours.generate(**batch, max_new_tokens=4, do_sample=False)
    assert len(calls) == 1


def test_compiled_generate_on_a_deep_copy_decodes_with_the_copys_weights():
    """transformers keeps generate()'s compiled forward on the model (`_compiled_call`), bound to that model, and
    `copy.deepcopy` copies it as it is: the copy must compile its own instead of decoding with the original's weights."""
    _, original = build_pair(attn_implementation="sdpa", vision="clip", text="llama")
    batch = left_padded_batch(original.config, num_images=(1,))
    batch.pop("labels")
    compile_config = CompileConfig(backend="eager", mode=None)  # dynamo traces the forward; no inductor
    compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told otherwise
    greedy = dict(batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, cache_implementation="static")
    original.generate(**greedy, compile_config=compile_config)
    assert "_compiled_call" in original.__dict__  # the compiled path was taken

    other = copy.deepcopy(original)
    with torch.no_grad():  # every logit moves to the next token id: another greedy answer
        other.lm_head.weight.copy_(other.lm_head.weight.roll(1, dims=0))
    expected = other.generate(**greedy, disable_compile=True)
    assert not torch.equal(expected, original.generate(**greedy, disable_compile=True))
    assert torch.equal(other.generate(**greedy, compile_config=compile_config), expected)
    assert compiled_for(other._compiled_call, other) and not compiled_for(original._compiled_call, other)

    def wrapper(*args, **kwargs):  # a callable that does not say whom it runs on is kept, not recompiled
        return other(*args, **kwargs)

    other._compiled_call = wrapper
    assert not drop_foreign_compiled_call(other) and other._compiled_call is wrapper


def _logits(model, batch):
    with torch.no_grad():
        return model(**{key: value for key, value in batch.items() if key != "labels"}).logits


def test_stock_checkpoint_loads_with_equal_logits(tmp_path):
    reference, _ = build_pair(vision="clip", text="llama")
    batch = left_padded_batch(reference.config)
    expected = _logits(reference, batch)

    # as transformers 5.x saves it (on disk: the 4.x layout, language_model.model.*, vision_tower.vision_model.*)
    reference.save_pretrained(tmp_path / "saved")
    # the in-memory 5.x layout (model.language_model.*) written as is
    in_memory = tmp_path / "in-memory"
    in_memory.mkdir()
    state = {key: value.contiguous().clone() for key, value in reference.state_dict().items()}
    save_file(state, in_memory / "model.safetensors", metadata={"format": "pt"})
    (in_memory / "config.json").write_text(json.dumps(reference.config.to_dict()))
    assert any(key.startswith("model.language_model.") for key in state)

    for directory in (tmp_path / "saved", in_memory):
        ours = LlavaExtForConditionalGeneration.from_pretrained(directory, attn_implementation="eager").eval()
        assert ours.config.model_type == "llava_ext"
        assert (_logits(ours, batch) - expected).abs().max().item() <= 1e-5


def test_save_and_reload_is_exact_and_keeps_the_stock_key_layout(tmp_path):
    reference, ours = build_pair(vision="siglip", text="qwen2", vision_feature_select_strategy="full")
    ours.save_pretrained(tmp_path / "ours")
    reference.save_pretrained(tmp_path / "reference")
    from safetensors import safe_open

    def keys(directory):
        with safe_open(directory / "model.safetensors", "pt") as handle:
            return set(handle.keys())

    assert keys(tmp_path / "ours") == keys(tmp_path / "reference")
    reloaded = LlavaExtForConditionalGeneration.from_pretrained(tmp_path / "ours")
    expected_state = ours.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, expected_state[key]), key
    auto_loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "ours")
    assert type(auto_loaded) is LlavaExtForConditionalGeneration


def test_image_token_mismatch_raises_before_the_vision_tower():
    _, ours = build_pair(vision="clip", text="llama")
    calls = []
    ours.model.vision_tower.embeddings.register_forward_hook(lambda *args: calls.append(1))
    batch = left_padded_batch(ours.config, num_images=(1, 1))
    batch.pop("labels")
    per_image = tokens_per_image(ours.config)  # 16: CLIP's 16 patches + CLS - CLS

    too_few = batch["input_ids"].clone()
    too_few[0, too_few[0].tolist().index(IMAGE_TOKEN_ID)] = 40  # one placeholder short, as an off-by-one processor
    with pytest.raises(ValueError, match=rf"{2 * per_image - 1} image tokens.*{2 * per_image} features"):
        ours(**{**batch, "input_ids": too_few})

    no_placeholder = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, 40)
    with pytest.raises(ValueError, match=r"0 image tokens.*no '<image>' placeholder"):
        ours(**{**batch, "input_ids": no_placeholder})

    truncated = batch["input_ids"][:, :-(per_image // 2 + 5)]  # cuts the second sample's placeholders
    with pytest.raises(ValueError, match=r"truncation"):
        ours(input_ids=truncated, pixel_values=batch["pixel_values"])
    assert calls == []


def test_gradient_checkpointing_backward_matches_plain_backward():
    _, ours = build_pair(vision="clip", text="llama")
    batch = left_padded_batch(ours.config)
    ours.train()

    def grads():
        ours.zero_grad()
        ours(**batch).loss.backward()
        return {name: p.grad.clone() for name, p in ours.named_parameters() if p.grad is not None}

    plain = grads()
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ours.model.vision_tower.encoder.layers[0].gradient_checkpointing
    assert ours.model.language_model.layers[0].gradient_checkpointing
    checkpointed = grads()
    assert "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight" in checkpointed
    assert "model.multi_modal_projector.linear_1.weight" in checkpointed
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_flash_attention_2_without_the_package_raises_transformers_error():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU error path")
    config = LlavaExtConfig(**tiny_llava_config().to_dict())
    with pytest.raises((ImportError, ValueError), match=r"[Ff]lash"):
        LlavaExtForConditionalGeneration._from_config(config, attn_implementation="flash_attention_2")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and flash-attn")
def test_flash_attention_2_matches_sdpa_in_bf16_on_gpu():
    pytest.importorskip("flash_attn")
    config = LlavaExtConfig(**tiny_llava_config(vision="clip", text="llama").to_dict())
    sdpa = LlavaExtForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    fa2 = LlavaExtForConditionalGeneration._from_config(
        config, attn_implementation="flash_attention_2", dtype=torch.bfloat16
    )
    fa2.load_state_dict(sdpa.state_dict())
    sdpa, fa2 = sdpa.cuda().eval(), fa2.cuda().eval()
    batch = left_padded_batch(config, num_images=(1, 1))
    batch = {key: value.cuda() for key, value in batch.items() if key != "labels"}
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    with torch.no_grad():
        expected, got = sdpa(**batch).logits, fa2(**batch).logits
    mask = batch["attention_mask"].bool()
    assert (expected[mask] - got[mask]).abs().max().item() <= 5e-2


@pytest.mark.slow
def test_compiles_with_fullgraph_and_matches_eager_forward():
    _, ours = build_pair(attn_implementation="sdpa", vision="clip", text="llama")
    batch = left_padded_batch(ours.config, num_images=(1, 1))
    batch.pop("labels")
    with torch.no_grad():
        expected = ours(**batch).logits
        compiled = torch.compile(ours, fullgraph=True)
        got = compiled(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_stock_llava_config_builds_our_model_with_the_stock_layout(tmp_path):
    reference, _ = build_pair(vision="clip", text="llama")
    ours = LlavaExtForConditionalGeneration(reference.config)  # a transformers LlavaConfig
    assert type(ours.config) is LlavaExtConfig and ours.model.config is ours.config
    ours.load_state_dict(reference.state_dict())
    ours.save_pretrained(tmp_path / "ours")
    stock = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    batch = left_padded_batch(reference.config)
    assert (_logits(stock, batch) - _logits(reference, batch)).abs().max().item() == 0


def test_mismatch_error_is_also_the_runtime_error_transformers_tests_expect():
    _, ours = build_pair(vision="clip", text="llama")
    batch = left_padded_batch(ours.config, num_images=(1, 1))
    with pytest.raises(RuntimeError, match="do not match"):
        ours(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"][:1])


def test_outputs_follow_the_installed_transformers_conventions():
    """Code written against transformers' own LLaVA reads ours the same way, on whatever release is installed."""
    reference, ours = build_pair(**PARITY_CASES["clip-llama-layer-2-default"])
    inputs = {k: v for k, v in left_padded_batch(reference.config).items() if k != "labels"}
    with torch.no_grad():
        ref_out, our_out = reference(**inputs, use_cache=True), ours(**inputs, use_cache=True)
        ref_base, our_base = reference.model(**inputs), ours.model(**inputs)
        ref_tuple, our_tuple = reference(**inputs, return_dict=False), ours(**inputs, return_dict=False)
    assert list(our_out.keys()) == list(ref_out.keys())  # field names and order, e.g. cache/image_outputs on 5.24
    assert list(our_base.keys()) == list(ref_base.keys())
    for ours_field, ref_field in zip(our_out.values(), ref_out.values()):
        assert type(ours_field).__name__ == type(ref_field).__name__
    # the image features, under the installed release's name (a deprecated property where it became one)
    for ours_features, ref_features in zip(our_out.image_hidden_states, ref_out.image_hidden_states):
        torch.testing.assert_close(ours_features, ref_features, rtol=0, atol=1e-5)
    if "image_outputs" in ref_out:
        assert len(our_out.image_outputs.pooler_output) == len(ref_out.image_outputs.pooler_output)
    assert len(our_tuple) == len(ref_tuple)
    assert [type(x).__name__ for x in our_tuple] == [type(x).__name__ for x in ref_tuple]
    cache_field = "cache" if "cache" in ref_out else "past_key_values"
    assert our_out[cache_field].get_seq_length() == ref_out[cache_field].get_seq_length() == inputs["input_ids"].shape[1]


def test_the_kv_cache_is_taken_under_either_name_but_not_both():
    reference, ours = build_pair(**PARITY_CASES["clip-llama-layer-2-default"])
    inputs = {k: v for k, v in left_padded_batch(reference.config).items() if k != "labels"}
    with torch.no_grad():
        prefill = ours(**inputs, use_cache=True)
        cache = prefill.cache if "cache" in prefill else prefill.past_key_values
        step = {"input_ids": torch.tensor([[70], [71]]),
                "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)}
        full = ours(input_ids=torch.cat([inputs["input_ids"], step["input_ids"]], dim=1),
                    attention_mask=step["attention_mask"], pixel_values=inputs["pixel_values"])
        for name in ("cache", "past_key_values"):
            cache.crop(inputs["input_ids"].shape[1] - cache.get_seq_length())  # negative: drop the last step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                logits = ours(**step, **{name: cache}).logits
            torch.testing.assert_close(logits[:, -1], full.logits[:, -1], rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="Both `cache` and `past_key_values`"):
            ours(**step, cache=cache, past_key_values=cache)


def test_get_image_features_returns_what_the_reference_returns_when_asked():
    reference, ours = build_pair(**PARITY_CASES["clip-llama-layers-3-1"])
    pixel_values = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        ref = reference.model.get_image_features(pixel_values, output_hidden_states=True, output_attentions=True)
        got = ours.model.get_image_features(pixel_values, output_hidden_states=True, output_attentions=True)
        ref_tuple = reference.model.get_image_features(pixel_values, output_hidden_states=True, return_dict=False)
        got_tuple = ours.get_image_features(pixel_values, output_hidden_states=True, return_dict=False)
    assert len(got.hidden_states) == len(ref.hidden_states) == reference.config.vision_config.num_hidden_layers + 1
    for ours_state, ref_state in zip(got.hidden_states, ref.hidden_states):
        torch.testing.assert_close(ours_state, ref_state, rtol=0, atol=1e-5)
    assert len(got.attentions) == len(ref.attentions) == reference.config.vision_config.num_hidden_layers
    for ours_attention, ref_attention in zip(got.attentions, ref.attentions):
        torch.testing.assert_close(ours_attention, ref_attention, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, rtol=0, atol=1e-5)
    for ours_features, ref_features in zip(got.pooler_output, ref.pooler_output):
        torch.testing.assert_close(ours_features, ref_features, rtol=0, atol=1e-5)
    assert isinstance(got_tuple, tuple) and len(got_tuple) == len(ref_tuple)
    assert [type(item).__name__ for item in got_tuple] == [type(item).__name__ for item in ref_tuple]


def test_get_image_features_runs_only_the_read_layers_unless_more_is_asked_for():
    _, ours = build_pair(**PARITY_CASES["clip-llama-layer-2-default"])  # reads layer -2 of 3
    ran = []
    hooks = [layer.register_forward_hook(lambda module, args, out, i=i: ran.append(i))
             for i, layer in enumerate(ours.model.vision_tower.encoder.layers)]
    pixel_values = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        plain = ours.model.get_image_features(pixel_values)
        assert ran == [0, 1] and plain.hidden_states is None and plain.attentions is None
        ran.clear()
        full = ours.model.get_image_features(pixel_values, output_hidden_states=True)
        assert ran == [0, 1, 2] and len(full.hidden_states) == 4
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(full.pooler_output[0], plain.pooler_output[0], rtol=0, atol=1e-6)
