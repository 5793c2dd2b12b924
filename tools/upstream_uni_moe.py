"""Write the Uni-MoE fidelity fixture (tests/data/upstream/uni_moe_speech/) with HITsz-TMG's own Uni-MoE code.

Run in a scratch environment with the upstream's pins (``Uni_MoE/env.txt``: transformers 4.31.0, peft 0.4.0,
accelerate 0.21.0, tokenizers 0.13.3, numpy 1.26), not mome's::

    python3.11 -m venv /work/scratch/unimoe-venv
    /work/scratch/unimoe-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/scratch/unimoe-venv/bin/pip install transformers==4.31.0 peft==0.4.0 accelerate==0.21.0 \
        tokenizers==0.13.3 "numpy<2" safetensors sentencepiece librosa soundfile pillow
    DS_BUILD_OPS=0 /work/scratch/unimoe-venv/bin/pip install deepspeed==0.14.5
    /work/scratch/unimoe-venv/bin/python tools/upstream_uni_moe.py /path/to/UMOE-Scaling-Unified-Multimodal-LLMs \
        tests/data/upstream --commit f5e82dd40b503e93dc1d76d6de86bb79ab6e67a1

(``Uni_MoE/env.txt`` pins DeepSpeed 0.12.6, which cannot be imported with torch 2.14: its elastic agent imports
``torch.distributed.elastic.agent.server.api.log``; 0.14.5 imports. transformers imports it through accelerate
when installed; the upstream uses only ``deepspeed.zero``, in ``maybe_zero_3``, which takes its plain-tensor
branch here.)

Nothing of the upstream is copied: the script puts ``<checkout>/Uni_MoE`` on ``sys.path`` and imports the package
``Uni_MoE_speech`` (the 4-expert Uni-MoE-speech model). It writes ``OUT/uni_moe_speech/`` with tiny random models
laid out as the upstream README's ``checkpoint`` folder, working from ``OUT/uni_moe_speech`` so that the tower paths
stored in the configs are the relative folders ``checkpoint/clip-tiny`` and ``checkpoint/whisper-tiny``:

1. towers, written with transformers' own classes, every parameter re-drawn: ``checkpoint/clip-tiny``
   (``CLIPVisionModel`` + ``CLIPImageProcessor``) and ``checkpoint/whisper-tiny`` (``WhisperModel`` +
   ``WhisperFeatureExtractor`` with 1 s chunks, i.e. 100 frames, + a tiny ``WhisperTokenizer`` holding the special
   tokens ``WhisperProcessor.from_pretrained(language="English", task="transcribe")`` needs);
2. ``checkpoint/Uni-MoE-speech-base`` (stand-in for the stage-2 backbone): ``LlavaLlamaForCausalLM(LlavaConfig(...,
   moe=True, num_experts=4, num_experts_per_tok=2))`` + ``initialize_vision_modules`` + ``initialize_audio_modules``
   (upstream's ``ModelArguments``, the stage-3 script's tower flags, tune flags off), every non-tower parameter
   re-drawn, ``save_pretrained`` + a tiny LLaMA sentencepiece tokenizer (96 pieces) + ``mm_projector.bin`` /
   ``mm_audio_aligner.bin`` written with ``get_mm_adapter_state_maybe_zero_3`` (the function
   ``safe_save_all_for_hf_trainer`` writes its projector and aligner files with);
3. ``checkpoint/Uni-MoE-speech-e2`` (stand-in for stage 3, ``finetune_speech.sh``): ``train.py``'s set-up
   (``from_pretrained(base)``, ``initialize_vision_modules(pretrain_mm_mlp_adapter=base/mm_projector.bin)``,
   ``initialize_audio_modules(pretrain_audio_aligner=base/mm_audio_aligner.bin)``, the tune flags, ``LoraConfig(r=8,
   lora_alpha=16, target_modules=find_all_llm_linear_names(model), lora_dropout=0.05)`` + ``get_peft_model``, gates
   trainable); instead of training, the LoRA A and B matrices, the gates, the image projector and the audio
   aligner's projector are re-drawn; then saved exactly as ``train.py``'s end (``get_peft_state_maybe_zero_3`` ->
   ``model.save_pretrained``, ``non_lora_trainables.bin``, ``safe_save_all_for_hf_trainer`` with a real
   ``LLaVATrainer``, non-DeepSpeed);
4. evaluation: ``model.all_builder.load_all_pretrained_model``'s ``'unimoe'`` + ``'lora'`` steps, in order, in fp32
   on CPU instead of its hard-coded fp16 (and without ``device_map="auto"``), then the towers' ``load_model()``;
5. six prompts, one at a time, built as ``inference_all.py`` builds its batch (dummy zero image + ``image_mask``
   False without an image, dummy zero video + ``video_mask`` False without a video, dummy ones features +
   ``features_mask`` [0] without audio); two of them hold a video of 8 frames. Outputs: logits, image/audio/video
   features, Whisper encoder output, router logits (hooks on every ``mlp.gate``) and greedy
   ``generate(..., use_cache=False)``. The dummy videos are not stored: the logits are checked to be the same
   without them. The data is checked (finite logits, spliced length = text ids + 16 per image or video + 8 per
   audio chunk, more than one top expert per layer, the LoRA merge changed the weights, no parameter
   left on the meta device) and the figures go to ``generation.json``, with which tower weights the model uses.

The fixture's ``README.md`` (not written by this script) describes every file. The script re-runs itself with
``PYTHONHASHSEED=0`` (``find_all_llm_linear_names`` returns a set, whose order goes into ``adapter_config.json``) and
sets ``logging_dir``, so two runs write byte-identical files.

Random values: every tower parameter and every re-drawn parameter: norm scales 1 + 0.1 N, other vectors 0.1 N
(biases) or 0.5 N, embeddings and query tokens 0.5 N, matrices N / sqrt(fan_in), the MoE gates twice that, LoRA B
half that (so the merged delta is of the size of the base weight).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

SEED = 2024
VOCAB, WIDTH, FFN, LAYERS, HEADS = 96, 32, 64, 4, 2
NUM_EXPERTS, TOP_K = 4, 2
QUERY_TOKENS = 8
IMAGE_SIZE, PATCH = 16, 4
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2
MEL_BINS, AUDIO_POSITIONS = 80, 50  # Whisper: features [80, 2 * 50], encoder output [50, d_model]
MAX_NEW_TOKENS = 4
IMAGE_TOKEN_INDEX, AUDIO_TOKEN_INDEX, VIDEO_TOKEN_INDEX = -200, -300, -400  # Uni_MoE_speech.constants
VIDEO_FRAMES = 8  # inference_all.py's dummy video has 8 frames
TEXT_IDS = (3, VOCAB - 2)  # text ids drawn in [3, 94): 94 and 95 stay free for a converter's placeholder ids
CLIP_DIR, WHISPER_DIR = "checkpoint/clip-tiny", "checkpoint/whisper-tiny"
BASE_DIR, E2_DIR = "checkpoint/Uni-MoE-speech-base", "checkpoint/Uni-MoE-speech-e2"
VISION = dict(
    hidden_size=WIDTH,
    intermediate_size=FFN,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=IMAGE_SIZE,
    patch_size=PATCH,
    hidden_act="quick_gelu",
    projection_dim=WIDTH,
)
WHISPER_SPECIALS = [
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]


def redraw(module: torch.nn.Module, generator: torch.Generator, keep=lambda name: False, lora_b_scale=0.5) -> None:
    """Re-draw every parameter whose name ``keep`` rejects (see the module docstring for the distributions)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if keep(name):
                continue
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if p.ndim == 1 and name.endswith("weight") and ("norm" in name or "layrnorm" in name):
                value = 1.0 + 0.1 * noise
            elif p.ndim == 1:
                value = (0.1 if name.endswith("bias") else 0.5) * noise
            elif "embed" in name or "query_tokens" in name:
                value = 0.5 * noise
            else:
                fan_in = p[0].numel()
                scale = 2.0 if name.endswith("mlp.gate.weight") else (lora_b_scale if "lora_B" in name else 1.0)
                value = scale * noise / fan_in**0.5
            p.copy_(value.to(p.dtype))


def write_towers(generator: torch.Generator) -> None:
    """The CLIP and Whisper stand-ins (for clip-vit-large-patch14-336 / whisper-small) with their processors."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperModel,
        WhisperTokenizer,
    )
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    clip = CLIPVisionModel(CLIPVisionConfig(**VISION))
    redraw(clip, generator)
    clip.save_pretrained(CLIP_DIR)
    size = {"shortest_edge": IMAGE_SIZE}
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    CLIPImageProcessor(size=size, crop_size=crop).save_pretrained(CLIP_DIR)

    # A byte-level BPE vocabulary of the space and the lower-case letters, no merges, plus Whisper's special tokens.
    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: i for i, b in enumerate(b" abcdefghijklmnopqrstuvwxyz")}
    vocab["<|endoftext|>"] = len(vocab)
    scratch = Path(WHISPER_DIR) / "_vocab"
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "vocab.json").write_text(json.dumps(vocab))
    (scratch / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = WhisperTokenizer(
        str(scratch / "vocab.json"),
        str(scratch / "merges.txt"),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": WHISPER_SPECIALS})
    shutil.rmtree(scratch)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    whisper_config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=MEL_BINS,
        d_model=WIDTH,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN,
        max_source_positions=AUDIO_POSITIONS,
        max_target_positions=16,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    whisper = WhisperModel(whisper_config)
    redraw(whisper, generator)
    whisper.save_pretrained(WHISPER_DIR)
    tokenizer.save_pretrained(WHISPER_DIR)
    # chunk_length 1 s: 16000 samples, 100 frames = 2 * max_source_positions (the encoder's fixed input length)
    WhisperFeatureExtractor(feature_size=MEL_BINS, chunk_length=1).save_pretrained(WHISPER_DIR)


def write_llama_tokenizer(folder: Path, generator: torch.Generator) -> None:
    """A 96-piece LLaMA sentencepiece tokenizer (unk 0, bos 1, eos 2, as LLaMA's), so that the loader's
    ``resize_token_embeddings(len(tokenizer))`` keeps the vocabulary of 96."""
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    words = [
        "".join(letters[int(i)] for i in torch.randint(0, 26, (int(n),), generator=generator))
        for n in torch.randint(2, 7, (4000,), generator=generator)
    ]
    sentences = [" ".join(words[i : i + 10]) for i in range(0, len(words), 10)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=VOCAB,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        normalization_rule_name="identity",
        num_threads=1,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = LlamaTokenizer(str(folder / "tokenizer.model"))
    assert len(tokenizer) == VOCAB, len(tokenizer)
    tokenizer.save_pretrained(folder)


def model_arguments(**overrides):
    """Upstream ``train.data.ModelArguments`` with ``finetune_speech.sh``'s flags and the tiny towers."""
    from Uni_MoE_speech.train.data import ModelArguments

    args = dict(
        vision_tower=CLIP_DIR,
        audio_tower=WHISPER_DIR,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        tune_mm_mlp_adapter=True,
        tune_mm_audio_projector=True,
        query_tokens_size=QUERY_TOKENS,
    )
    args.update(overrides)
    return ModelArguments(**args)


def training_arguments(output_dir: Path):
    """Upstream ``train.data.TrainingArguments`` as ``finetune_speech.sh`` sets the LoRA part, on CPU, fp32."""
    from Uni_MoE_speech.train.data import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        logging_dir="runs",  # default: a time stamp and the host name, pickled into training_args.bin
        llm_lora_enable=True,
        report_to="none",
        no_cuda=True,
        save_safetensors=False,
    )


def configure_like_train_py(model, model_args, training_args, data_args) -> None:
    """The config fields and trainable flags ``train.py`` sets after ``initialize_vision_modules`` and
    ``initialize_audio_modules`` (its tower casts to bf16 are left out: fp32 on CPU)."""
    config = model.config
    config.image_aspect_ratio = data_args.image_aspect_ratio
    config.image_grid_pinpoints = data_args.image_grid_pinpoints
    config.tune_mm_mlp_adapter = training_args.tune_mm_mlp_adapter = model_args.tune_mm_mlp_adapter
    if model_args.tune_mm_mlp_adapter:
        model.requires_grad_(False)
        for p in model.get_model().mm_projector.parameters():
            p.requires_grad = True
    config.freeze_mm_mlp_adapter = training_args.freeze_mm_mlp_adapter
    config.mm_use_im_start_end = model_args.mm_use_im_start_end
    config.mm_projector_lr = training_args.mm_projector_lr
    config.mm_use_im_patch_token = model_args.mm_use_im_patch_token
    if model_args.tune_mm_audio_projector:
        model.requires_grad_(False)
        for p in model.get_model().mm_audio_aligner.projector.parameters():
            p.requires_grad = True


def build_base(generator: torch.Generator) -> None:
    from Uni_MoE_speech.model import LlavaConfig, LlavaLlamaForCausalLM
    from Uni_MoE_speech.train.data import DataArguments
    from Uni_MoE_speech.train.train import get_mm_adapter_state_maybe_zero_3

    config = LlavaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        moe=True,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
    )
    model = LlavaLlamaForCausalLM(config)
    model_args = model_arguments(tune_mm_mlp_adapter=False, tune_mm_audio_projector=False)
    model.get_model().initialize_vision_modules(model_args=model_args)
    model.get_model().initialize_audio_modules(model_args=model_args)
    configure_like_train_py(model, model_args, training_arguments(Path(BASE_DIR)), DataArguments())
    model.requires_grad_(True)
    redraw(model, generator, keep=lambda name: "vision_tower" in name or "audio_tower" in name)
    folder = Path(BASE_DIR)
    model.save_pretrained(folder)
    write_llama_tokenizer(folder, generator)
    named = list(model.named_parameters())
    torch.save(
        get_mm_adapter_state_maybe_zero_3(named, ["mm_projector", "vision_resampler"]), folder / "mm_projector.bin"
    )
    torch.save(
        get_mm_adapter_state_maybe_zero_3(named, ["mm_audio_aligner", "query_tokens"]), folder / "mm_audio_aligner.bin"
    )


def build_e2(generator: torch.Generator) -> None:
    """``train.py``'s stage-3 set-up and save, without the training loop."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from Uni_MoE_speech.model import LlavaLlamaForCausalLM
    from Uni_MoE_speech.train.data import DataArguments
    from Uni_MoE_speech.train.llava_trainer import LLaVATrainer
    from Uni_MoE_speech.train.train import (
        find_all_llm_linear_names,
        get_peft_state_maybe_zero_3,
        get_peft_state_non_lora_maybe_zero_3,
        safe_save_all_for_hf_trainer,
    )

    out = Path(E2_DIR)
    model_args = model_arguments(
        model_name_or_path=BASE_DIR,
        pretrain_mm_mlp_adapter=f"{BASE_DIR}/mm_projector.bin",
        pretrain_audio_aligner=f"{BASE_DIR}/mm_audio_aligner.bin",
    )
    training_args = training_arguments(out)
    data_args = DataArguments()
    model = LlavaLlamaForCausalLM.from_pretrained(model_args.model_name_or_path)
    model.config.use_cache = False
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        model_max_length=training_args.model_max_length,
        padding_side="right",
        use_fast=False,
    )
    tokenizer.pad_token = tokenizer.unk_token
    model.get_model().initialize_vision_modules(model_args=model_args, fsdp=training_args.fsdp)
    model.get_model().initialize_audio_modules(model_args=model_args, fsdp=training_args.fsdp)
    configure_like_train_py(model, model_args, training_args, data_args)
    model.initialize_vision_tokenizer(model_args, tokenizer=tokenizer)
    training_args.tune_mm_audio_aligner = model_args.tune_mm_audio_aligner
    training_args.tune_mm_audio_projector = model_args.tune_mm_audio_projector
    lora_config = LoraConfig(
        r=training_args.lora_r,
        lora_alpha=training_args.lora_alpha,
        target_modules=find_all_llm_linear_names(model),
        lora_dropout=training_args.lora_dropout,
        bias=training_args.lora_bias,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora_config)
    for p in model.get_model().mm_projector.parameters():
        p.requires_grad = True
    for p in model.get_model().mm_audio_aligner.projector.parameters():
        p.requires_grad = True
    for pname, p in model.get_model().named_parameters():
        if "mlp.gate" in pname:
            p.requires_grad = True
    training_args.lora_enable = training_args.llm_lora_enable

    # Instead of training: new values for what stage 3 trains (the LoRA factors, gates and both projectors).
    trained = ("lora_A", "lora_B", "mlp.gate.weight", "mm_projector", "mm_audio_aligner.projector")
    redraw(model, generator, keep=lambda name: not any(t in name for t in trained))

    trainer = LLaVATrainer(model=model, tokenizer=tokenizer, args=training_args)
    model.config.use_cache = True
    state_dict = get_peft_state_maybe_zero_3(model.named_parameters(), training_args.lora_bias)
    non_lora_state_dict = get_peft_state_non_lora_maybe_zero_3(model.named_parameters())
    model.config.save_pretrained(training_args.output_dir)
    model.save_pretrained(training_args.output_dir, state_dict=state_dict)
    torch.save(non_lora_state_dict, os.path.join(training_args.output_dir, "non_lora_trainables.bin"))
    safe_save_all_for_hf_trainer(trainer=trainer, output_dir=training_args.output_dir)


def load_for_eval():
    """``load_all_pretrained_model(E2_DIR, BASE_DIR, "unimoe_lora", vison_tower_path=CLIP_DIR,
    audio_tower_path=WHISPER_DIR)``'s steps in order, fp32 (upstream: fp16, device_map="auto")."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoTokenizer
    from Uni_MoE_speech.model import LlavaLlamaForCausalLM

    model_path, model_base = E2_DIR, BASE_DIR
    lora_cfg_pretrained = AutoConfig.from_pretrained(model_path)
    lora_cfg_pretrained.mm_vision_tower = CLIP_DIR
    lora_cfg_pretrained.mm_audio_tower = WHISPER_DIR
    tokenizer = AutoTokenizer.from_pretrained(model_base, use_fast=False)
    model = LlavaLlamaForCausalLM.from_pretrained(
        model_base, low_cpu_mem_usage=True, config=lora_cfg_pretrained, torch_dtype=torch.float32
    )
    base_q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    base_gate = model.model.layers[0].mlp.gate.weight.detach().clone()
    non_lora_trainables = torch.load(os.path.join(model_path, "non_lora_trainables.bin"), map_location="cpu")
    non_lora_trainables = {(k[11:] if k.startswith("base_model.") else k): v for k, v in non_lora_trainables.items()}
    if any(k.startswith("model.model.") for k in non_lora_trainables):
        non_lora_trainables = {(k[6:] if k.startswith("model.") else k): v for k, v in non_lora_trainables.items()}
    model.load_state_dict(non_lora_trainables, strict=False)
    model = PeftModel.from_pretrained(model, model_path)
    model = model.merge_and_unload()
    aligner = torch.load(os.path.join(model_path, "mm_audio_aligner.bin"), map_location="cpu")
    model.load_state_dict({k: v.to(torch.float32) for k, v in aligner.items()}, strict=False)
    gates = torch.load(os.path.join(model_path, "mlp_gates.bin"), map_location="cpu")
    model.load_state_dict({k: v.to(torch.float32) for k, v in gates.items()}, strict=False)
    # 'unimoe' tail: tokenizer tokens (none added: mm_use_im_patch_token / mm_use_im_start_end are False), towers
    model.resize_token_embeddings(len(tokenizer))
    vision_tower = model.get_vision_tower()
    if not vision_tower.is_loaded:
        vision_tower.load_model()
    vision_tower.to(dtype=torch.float32)
    audio_tower = model.get_audio_tower()
    if not audio_tower.is_loaded:
        audio_tower.load_model()
    audio_tower.to(dtype=torch.float32)
    assert not any(t.is_meta for t in model.state_dict().values()), "a parameter was left on the meta device"
    checks = {
        "lora_merge_max_abs_change_layer0_q_proj": float(
            (model.model.layers[0].self_attn.q_proj.weight - base_q).abs().max()
        ),
        "mlp_gates_max_abs_change_layer0": float((model.model.layers[0].mlp.gate.weight - base_gate).abs().max()),
    }
    return model.eval(), checks


def tower_checks(model) -> dict:
    """Which tower weights the loaded model uses: the towers' folders (``load_model``), not the checkpoint copies."""
    from transformers import CLIPVisionModel, WhisperModel

    base = torch.load(Path(BASE_DIR) / "pytorch_model.bin", map_location="cpu")
    clip = CLIPVisionModel.from_pretrained(CLIP_DIR).state_dict()
    whisper = WhisperModel.from_pretrained(WHISPER_DIR).state_dict()

    def max_diff(prefix: str, reference: dict, ref_prefix: str) -> float:
        keys = [k for k in base if k.startswith(prefix)]
        assert keys, prefix
        return max(float((base[k] - reference[ref_prefix + k[len(prefix) :]]).abs().max()) for k in keys)

    used_audio = model.get_audio_tower().audio_tower.state_dict()
    used_vision = model.get_vision_tower().vision_tower.state_dict()
    return {
        "clip_folder_vs_base_copy_model.vision_tower.vision_tower": max_diff(
            "model.vision_tower.vision_tower.", clip, ""
        ),
        "whisper_encoder_folder_vs_base_copy_model.audio_tower.audio_tower": max_diff(
            "model.audio_tower.audio_tower.", whisper, "encoder."
        ),
        "whisper_encoder_folder_vs_base_shell_model.audio_tower.encoder": max_diff(
            "model.audio_tower.encoder.", whisper, "encoder."
        ),
        "whisper_decoder_folder_vs_base_aligner_decoder": max_diff(
            "model.mm_audio_aligner.decoder.audio_decoder.", whisper, "decoder."
        ),
        "loaded_audio_tower_vs_whisper_folder_encoder": max(
            float((v - whisper["encoder." + k]).abs().max()) for k, v in used_audio.items()
        ),
        "loaded_vision_tower_vs_clip_folder": max(float((v - clip[k]).abs().max()) for k, v in used_vision.items()),
    }


def processor_check(model, generator: torch.Generator) -> list[int]:
    """``inference_all.py``'s audio preprocessing with the loaded ``audio_processor``: 1 s of audio -> features."""
    processor = model.get_audio_tower().audio_processor
    processor.tokenizer.set_prefix_tokens(language="English")
    sample = (0.1 * torch.randn(16000, generator=generator)).numpy()
    features = processor(audio=sample, sampling_rate=16000).input_features
    return list(torch.tensor(features[0]).shape)


def make_prompts(generator: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    """Six prompts with ``inference_all.initial_input``'s batch fields (batch 1)."""

    def text(n: int) -> list[int]:
        return torch.randint(*TEXT_IDS, (n,), generator=generator).tolist()

    def features(chunks: int) -> torch.Tensor:
        return 0.5 * torch.randn(1, chunks, MEL_BINS, 2 * AUDIO_POSITIONS, generator=generator)

    def image() -> torch.Tensor:
        return torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)

    def video() -> torch.Tensor:
        return torch.randn(1, VIDEO_FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)

    no_image = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    no_video = torch.zeros(1, VIDEO_FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE)
    no_audio = torch.ones(1, 1, MEL_BINS, 2 * AUDIO_POSITIONS)
    specs = {
        # <image>\n<audio>\n + query, one 30 s chunk
        "prompt_a": (
            [1, *text(3), IMAGE_TOKEN_INDEX, *text(2), AUDIO_TOKEN_INDEX, *text(7)],
            image(),
            features(1),
            [1],
        ),
        # <audio>\n + query, a clip of two chunks (one features_mask id): both chunks' tokens go to one <audio>
        "prompt_b": ([1, *text(4), AUDIO_TOKEN_INDEX, *text(6)], None, features(2), [1, 1]),
        # <image>\n + query, no audio
        "prompt_c": ([1, *text(2), IMAGE_TOKEN_INDEX, *text(9)], image(), None, None),
        # audio placeholder before the image placeholder
        "prompt_d": (
            [1, *text(2), AUDIO_TOKEN_INDEX, *text(3), IMAGE_TOKEN_INDEX, *text(5)],
            image(),
            features(1),
            [1],
        ),
    }
    # drawn after prompts a-d, which stay as they were: <video>\n<audio>\n + query, and <image> + <video>
    video_audio = [1, *text(2), VIDEO_TOKEN_INDEX, *text(2), AUDIO_TOKEN_INDEX, *text(4)]
    specs["prompt_e"] = (video_audio, None, features(1), [1])
    image_video = [1, *text(2), IMAGE_TOKEN_INDEX, *text(2), VIDEO_TOKEN_INDEX, *text(4)]
    specs["prompt_f"] = (image_video, image(), None, None)
    videos = {"prompt_e": video(), "prompt_f": video()}
    prompts = {}
    for name, (ids, img, feats, mask) in specs.items():
        prompts[name] = {
            "input_ids": torch.tensor([ids]),
            "images": no_image if img is None else img,
            "image_mask": torch.tensor([img is not None]),
            "videos": videos.get(name, no_video),
            "video_mask": torch.tensor([name in videos]),
            "input_features": no_audio if feats is None else feats,
            "features_mask": torch.tensor([[0] if mask is None else mask]),
        }
    return prompts


def run_prompt(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream outputs for one prompt (see the README for each name)."""
    out: dict[str, torch.Tensor] = {}
    router: dict[str, torch.Tensor] = {}
    handles = [
        layer.mlp.gate.register_forward_hook(
            lambda module, args, output, i=i: router.setdefault(f"router_logits.{i}", output.detach().clone())
        )
        for i, layer in enumerate(model.model.layers)
    ]
    inputs = dict(batch, attention_mask=None)
    with torch.no_grad():
        result = model(**inputs, use_cache=False, return_dict=True)
        for handle in handles:
            handle.remove()
        out["logits"] = result.logits
        if not bool(batch["video_mask"][0]):
            # the dummy video (video_mask False) is encoded and dropped: the same logits without it
            without_video = model(**dict(inputs, videos=None, video_mask=None), use_cache=False, return_dict=True)
            assert torch.equal(without_video.logits, result.logits)
        else:  # prepare_inputs_labels_for_audio_and_vision's video path: encode_images per frame, mean over frames
            frames = model.encode_images(batch["videos"][0])  # [F, P, D]
            out["video_features"] = frames.mean(dim=0, dtype=batch["videos"].dtype)[None]  # [1, P, D]
        out.update(router)
        out["image_tower_features"] = model.get_vision_tower()(batch["images"])
        out["image_features"] = model.encode_images(batch["images"])
        mask = batch["features_mask"][0]
        chunks = int((mask > 0).sum())
        if chunks:
            feats = batch["input_features"][0]
            out["audio_tower_features"] = model.get_audio_tower()(feats[:1])
            out["audio_features"] = torch.cat([model.encode_audios(feats[i][None, None]) for i in range(chunks)])
        generated = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, use_cache=False)
        out["generated"] = generated[0, batch["input_ids"].shape[1] :]
    return {k: v.float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in out.items()}


def check(name: str, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict:
    """Sanity checks of one prompt's data (raise on failure) and the figures recorded in generation.json."""
    ids = batch["input_ids"][0]
    images = int((ids == IMAGE_TOKEN_INDEX).sum()) + int((ids == VIDEO_TOKEN_INDEX).sum())
    chunks = int((batch["features_mask"][0] > 0).sum())
    text = int((ids >= 0).sum())
    expected = text + NUM_PATCHES * images + QUERY_TOKENS * chunks
    assert out["logits"].shape == (1, expected, VOCAB), (name, out["logits"].shape, expected)
    assert torch.isfinite(out["logits"]).all(), name
    spread = []
    for layer in range(LAYERS):
        logits = out[f"router_logits.{layer}"]
        assert logits.shape == (expected, NUM_EXPERTS), (name, layer, logits.shape)
        assert torch.unique(logits.argmax(-1)).numel() > 1, (name, layer, "every token routed to one expert")
        spread.append(float(logits.std(0).mean()))
    if chunks:
        assert out["audio_features"].shape == (chunks, QUERY_TOKENS, WIDTH), name
        assert out["audio_tower_features"].shape == (1, AUDIO_POSITIONS, WIDTH), name
    return dict(spliced_length=expected, text_ids=text, images=images, audio_chunks=chunks, router_std=spread)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream", type=Path, help="a checkout of HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs")
    parser.add_argument("out", type=Path, help="tests/data/upstream (the folder uni_moe_speech is written)")
    parser.add_argument("--commit", default=None, help="the checkout's commit (default: git rev-parse)")
    args = parser.parse_args(argv)
    upstream = args.upstream.resolve()
    commit = (
        args.commit
        or subprocess.run(
            ["git", "-C", str(upstream), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    if os.environ.get("PYTHONHASHSEED") != "0":  # find_all_llm_linear_names returns a set's order
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    folder = args.out.resolve() / "uni_moe_speech"
    sys.path.insert(0, str(upstream / "Uni_MoE"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)  # the configs hold the tower folders relative to here, as finetune_speech.sh's checkpoints/...

    import peft
    import transformers

    torch.manual_seed(SEED)  # modules' own initialisation (every value that matters is re-drawn below)
    generator = torch.Generator().manual_seed(SEED)
    write_towers(generator)
    build_base(generator)
    build_e2(generator)
    model, load_checks = load_for_eval()
    assert load_checks["lora_merge_max_abs_change_layer0_q_proj"] > 0
    load_checks["towers_max_abs_diff"] = tower_checks(model)
    load_checks["audio_processor_features_shape"] = processor_check(model, generator)
    prompts = make_prompts(generator)
    inputs, outputs, prompt_checks = {}, {}, {}
    for name, batch in prompts.items():
        result = run_prompt(model, batch)
        prompt_checks[name] = check(name, batch, result)
        # the dummy videos (zeros [1, 8, 3, 16, 16], video_mask False) are not stored: they change nothing
        stored = {k: v for k, v in batch.items() if k != "videos" or bool(batch["video_mask"][0])}
        inputs.update({f"{name}.{k}": v.clone().contiguous() for k, v in stored.items()})  # dummies are shared
        outputs.update({f"{name}.{k}": v for k, v in result.items()})
        prompt_checks[name]["generated"] = result["generated"].tolist()
    save_file(inputs, "inputs.safetensors")
    save_file(outputs, "outputs.safetensors")
    meta = {
        "upstream": "HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs",
        "package": "Uni_MoE/Uni_MoE_speech",
        "commit": commit,
        "generator": "tools/upstream_uni_moe.py",
    }
    Path("meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    generation = {
        "seed": SEED,
        "sizes": dict(
            vocab=VOCAB,
            width=WIDTH,
            ffn=FFN,
            layers=LAYERS,
            heads=HEADS,
            num_experts=NUM_EXPERTS,
            top_k=TOP_K,
            query_tokens=QUERY_TOKENS,
            image_size=IMAGE_SIZE,
            patch=PATCH,
            mel_bins=MEL_BINS,
            audio_positions=AUDIO_POSITIONS,
            max_new_tokens=MAX_NEW_TOKENS,
        ),
        "text_ids": list(TEXT_IDS),
        "checks": {"load": load_checks, "prompts": prompt_checks},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "deepspeed": __import__("deepspeed").__version__,
        },
    }
    Path("generation.json").write_text(json.dumps(generation, indent=2) + "\n")
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
