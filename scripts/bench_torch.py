#!/usr/bin/env python3
"""The PyTorch side of the side-by-side benchmarks (`scripts/bench_all.sh`, BENCHMARKS.md).

Pinned: transformers==4.57.1, torch==2.15.0.

Each subcommand measures what the `zoo bench` subcommand of the same name measures, on the same
HF folders, and prints one JSON object with the same keys ("impl": "pytorch"):

    PY=/tmp/ref/bin/python
    $PY scripts/bench_torch.py make-models /tmp/zoo-bench-models [--force]
    $PY scripts/bench_torch.py embed --model /tmp/zoo-bench-models/clip-vit-b-32 --batch 8 \
        --threads 2 --warmup 1 --repeats 5
    $PY scripts/bench_torch.py train-step --model DIR --batch 16 --threads 2 --warmup 1 --steps 5
    $PY scripts/bench_torch.py caption --model DIR/blip-small --threads 2 --images 5 \
        --max-new-tokens 20 --warmup 1
    $PY scripts/bench_torch.py generate --model DIR/llama-small --threads 2 --max-new-tokens 64 \
        --prompts scripts/bench_prompts.txt --warmup 1
    $PY scripts/bench_torch.py attention --lengths 256,512,1024,2048,4096 --heads 8 \
        --head-dim 64 --batch 1 --causal --mode forward --threads 2 --repeats 5
    $PY scripts/bench_torch.py machine        # the machine description bench_all.sh records

`make-models` writes random-weight (seed 0) HF folders with the architectures of
openai/clip-vit-base-patch32, google/siglip-base-patch16-224, BLIP-base's captioner at 224
pixels and a small Llama with a byte-level BPE tokenizer trained on data/licences/train; no hub
access is needed. Inputs are random tensors of the model's shapes, so image decoding and
tokenisation are not timed. Every time is the median of the timed runs after the untimed
warmups (the upper median for an even count, as `zoo bench` takes it), measured with
`time.perf_counter`. The models run with transformers' default attention implementation
(`sdpa`) and, in training, `torch.optim.AdamW`'s default CPU implementation.

Peak memory in `attention` is RSS-based: each (length, backend) runs in a fresh child process,
which runs the backend once at 16 positions (paging in its code and starting the thread pool),
allocates its inputs, reads `getrusage(RUSAGE_SELF).ru_maxrss`, does the runs and reads it
again; the difference is the peak resident memory the attention itself added. Memory the
allocator reuses without giving back counts once; memory never touched does not count.
"""

import argparse
import json
import multiprocessing
import shutil
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
import transformers

PINNED = {"transformers": "4.57.1", "torch": "2.15.0"}
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
LICENCES = os.path.join(ROOT, "data", "licences", "train")


def check_versions():
    found = {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}
    for name, version in PINNED.items():
        if found[name] != version:
            print(
                f"warning: {name} {found[name]} found; the benchmark is pinned to {version}",
                file=sys.stderr,
            )


# ---------------------------------------------------------------------------------------------
# make-models


def clip_model():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=8,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        ),
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            patch_size=32,
            image_size=224,
            hidden_act="quick_gelu",
        ),
        projection_dim=512,
    )
    return CLIPModel(config), CLIPImageProcessor()


def siglip_model():
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    tower = dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="gelu_pytorch_tanh",
    )
    config = SiglipConfig(
        text_config=dict(tower, vocab_size=32000, max_position_embeddings=64),
        vision_config=dict(tower, patch_size=16, image_size=224),
    )
    return SiglipModel(config), SiglipImageProcessor(size={"height": 224, "width": 224})


def blip_model():
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    vision = BlipVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        patch_size=16,
        image_size=224,
    )
    config = BlipConfig(text_config=BlipTextConfig().to_dict(), vision_config=vision.to_dict())
    processor = BlipImageProcessor(size={"height": 224, "width": 224})
    return BlipForConditionalGeneration(config), processor


def licence_tokenizer(vocab_size):
    """Byte-level BPE on the Debian licence texts, laid out as `TextTokenizer::train_bpe` lays
    out its own: `<pad>` 0, `<s>` 1, `</s>` 2, and `<s>` before every encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    files = sorted(
        os.path.join(LICENCES, name) for name in os.listdir(LICENCES) if name.endswith(".txt")
    )
    if not files:
        sys.exit(f"no .txt files in {LICENCES}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    for token, expected in [("<pad>", 0), ("<s>", 1), ("</s>", 2)]:
        assert tok.token_to_id(token) == expected, f"{token} is not id {expected}"
    return tok


def llama_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def save_llama(folder):
    from tokenizers import Tokenizer

    model = llama_model()
    tok = licence_tokenizer(model.config.vocab_size)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    tok.save(path)
    loaded = Tokenizer.from_file(path)
    ids = loaded.encode("Permission is hereby granted, free of charge").ids
    assert ids[0] == 1 and len(ids) > 1, ids
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "clean_up_tokenization_spaces": False,
                "model_max_length": model.config.max_position_embeddings,
            },
            f,
            indent=2,
        )
    print(f"  tokenizer: {loaded.get_vocab_size()} tokens", file=sys.stderr)
    model.save_pretrained(folder, safe_serialization=True)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_with_processor(build, tokenizer=None):
    """Saves the model and its image processor; `tokenizer` names a tokenizer.json bundled in
    datasets/assets to copy beside them (`zoo bench train-step` loads the folder as a training
    run would, tokenizer included; the benchmarks feed random ids)."""

    def save(folder):
        model, processor = build()
        os.makedirs(folder, exist_ok=True)
        processor.save_pretrained(folder)
        model.save_pretrained(folder, safe_serialization=True)
        if tokenizer:
            shutil.copy(
                os.path.join(REPO, "datasets", "assets", tokenizer, "tokenizer.json"),
                os.path.join(folder, "tokenizer.json"),
            )

    return save


MODELS = {
    "clip-vit-b-32": save_with_processor(clip_model, "clip"),
    "siglip-base-patch16-224": save_with_processor(siglip_model, "clip"),
    "blip-small": save_with_processor(blip_model, "bert-uncased"),
    "llama-small": save_llama,
}


def cmd_make_models(args):
    for name, save in MODELS.items():
        folder = os.path.abspath(os.path.join(args.out_dir, name))
        if os.path.exists(os.path.join(folder, "config.json")) and not args.force:
            print(f"{folder} (exists; --force rewrites it)", file=sys.stderr)
        else:
            print(f"writing {folder}", file=sys.stderr)
            torch.manual_seed(0)
            save(folder)
        print(folder)


# ---------------------------------------------------------------------------------------------
# Shared helpers


def load(folder):
    """The model class for the folder's `model_type`, in f32, and its config."""
    with open(os.path.join(folder, "config.json")) as f:
        model_type = json.load(f)["model_type"]
    classes = {
        "clip": transformers.CLIPModel,
        "siglip": transformers.SiglipModel,
        "blip": transformers.BlipForConditionalGeneration,
        "llama": transformers.LlamaForCausalLM,
    }
    if model_type not in classes:
        sys.exit(f"{folder}: model_type {model_type!r} is not benchmarked")
    model = classes[model_type].from_pretrained(folder, dtype=torch.float32)
    return model_type, model


def model_name(folder):
    return os.path.basename(os.path.normpath(folder))


def median_seconds(fn, warmup, repeats):
    """Median wall time of `repeats` calls after `warmup` untimed ones (the upper median for an
    even count, as `zoo bench` takes it)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def random_inputs(config, batch):
    """Seeded random pixels [B, 3, S, S] in [-1, 1) and token ids [B, L], L the text tower's
    `max_position_embeddings`."""
    vision, text = config.vision_config, config.text_config
    size, length = vision.image_size, text.max_position_embeddings
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch, vision.num_channels, size, size, generator=gen) * 2 - 1
    ids = torch.randint(3, text.vocab_size, (batch, length), generator=gen)
    return pixels, ids


def gemm_peak_gflops():
    """Best f32 GFLOP/s of square `torch.mm` at n = 1024 and 2048 (2·n³ per product)."""
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def vision_flops(model_type, config):
    """Forward FLOPs of one image through the vision tower: 2·m·n·k for every matmul (patch
    embedding, q/k/v and output projections, QKᵀ and PV, the MLP, and CLIP's projection or
    SigLIP's attention-pooling head), no elementwise work."""
    v = config.vision_config
    d, inner, layers = v.hidden_size, v.intermediate_size, v.num_hidden_layers
    patches = (v.image_size // v.patch_size) ** 2
    tokens = patches + (1 if model_type == "clip" else 0)  # CLIP prepends a class token

    def matmul(m, n, k):
        return 2 * m * n * k

    total = matmul(patches, d, v.num_channels * v.patch_size**2)
    attention = (
        matmul(tokens, 3 * d, d)  # q, k, v
        + matmul(tokens, tokens, d)  # QKᵀ, all heads
        + matmul(tokens, d, tokens)  # PV, all heads
        + matmul(tokens, d, d)  # output projection
    )
    mlp = matmul(tokens, inner, d) + matmul(tokens, d, inner)
    total += layers * (attention + mlp)
    if model_type == "clip":
        total += matmul(1, config.projection_dim, d)
    elif getattr(v, "vision_use_head", True):
        # SigLIP's pooling head: one probe query attends over every token, then an MLP.
        total += (
            matmul(1, d, d)
            + matmul(tokens, 2 * d, d)
            + matmul(1, tokens, d)
            + matmul(1, d, tokens)
            + matmul(1, d, d)
            + matmul(1, inner, d)
            + matmul(1, d, inner)
        )
    return total


def emit(report):
    print(json.dumps(report))


# ---------------------------------------------------------------------------------------------
# embed, train-step, caption, generate


def cmd_embed(args):
    model_type, model = load(args.model)
    if model_type not in ("clip", "siglip"):
        sys.exit(f"embed benchmarks CLIP and SigLIP; {args.model} is {model_type}")
    model.eval()
    pixels, ids = random_inputs(model.config, args.batch)
    with torch.inference_mode():
        image_s = median_seconds(
            lambda: model.get_image_features(pixel_values=pixels), args.warmup, args.repeats
        )
        text_s = median_seconds(
            lambda: model.get_text_features(input_ids=ids), args.warmup, args.repeats
        )
        gemm = gemm_peak_gflops()
    flop = vision_flops(model_type, model.config) / 1e9
    images_per_s = args.batch / image_s
    emit(
        {
            "bench": "embed",
            "impl": "pytorch",
            "model": model_name(args.model),
            "threads": torch.get_num_threads(),
            "batch": args.batch,
            "image_size": pixels.shape[-1],
            "text_len": ids.shape[-1],
            "image_ms": image_s * 1e3,
            "text_ms": text_s * 1e3,
            "images_per_s": images_per_s,
            "texts_per_s": args.batch / text_s,
            "gemm_gflops": gemm,
            "vision_gflop_per_image": flop,
            "mfu": flop * images_per_s / gemm,
        }
    )


def siglip_loss(logits_per_text):
    """The SigLIP paper's sigmoid loss: +1 labels on the diagonal, -1 elsewhere,
    -Σ log σ(label · logit) / B. The logits already carry exp(logit_scale) and logit_bias."""
    batch = logits_per_text.shape[0]
    labels = 2 * torch.eye(batch, dtype=logits_per_text.dtype) - 1
    return -F.logsigmoid(labels * logits_per_text).sum() / batch


def cmd_train_step(args):
    model_type, model = load(args.model)
    if model_type not in ("clip", "siglip"):
        sys.exit(f"train-step benchmarks CLIP and SigLIP; {args.model} is {model_type}")
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-5, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6
    )
    pixels, ids = random_inputs(model.config, args.batch)

    def step():
        if model_type == "clip":
            loss = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        else:
            loss = siglip_loss(model(input_ids=ids, pixel_values=pixels).logits_per_text)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    seconds = median_seconds(step, args.warmup, args.steps)
    emit(
        {
            "bench": "train-step",
            "impl": "pytorch",
            "model": model_name(args.model),
            "threads": torch.get_num_threads(),
            "batch": args.batch,
            "ms_per_step": seconds * 1e3,
            "samples_per_s": args.batch / seconds,
        }
    )


def cmd_caption(args):
    model_type, model = load(args.model)
    if model_type != "blip":
        sys.exit(f"caption benchmarks BLIP; {args.model} is {model_type}")
    model.eval()
    size = model.config.vision_config.image_size
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(args.images, 3, size, size, generator=gen) * 2 - 1
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens,
        num_beams=1,
        do_sample=False,
    )
    with torch.inference_mode():
        for _ in range(args.warmup):
            model.generate(pixel_values=images[:1], **settings)
        total = 0.0
        for i in range(args.images):
            start = time.perf_counter()
            out = model.generate(pixel_values=images[i : i + 1], **settings)
            total += time.perf_counter() - start
            # The output starts with the one-token [DEC] prompt.
            assert out.shape[1] == 1 + args.max_new_tokens, out.shape
    emit(
        {
            "bench": "caption",
            "impl": "pytorch",
            "model": model_name(args.model),
            "threads": torch.get_num_threads(),
            "new_tokens": args.max_new_tokens,
            "images": args.images,
            "ms_per_caption": total / args.images * 1e3,
        }
    )


def cmd_generate(args):
    from tokenizers import Tokenizer

    model_type, model = load(args.model)
    if model_type != "llama":
        sys.exit(f"generate benchmarks Llama; {args.model} is {model_type}")
    model.eval()
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    with open(args.prompts) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        sys.exit(f"{args.prompts} has no prompts")
    encoded = [torch.tensor([tok.encode(p).ids]) for p in prompts]
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens,
        num_beams=1,
        do_sample=False,
        pad_token_id=model.config.pad_token_id,
    )

    def decode(ids):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
        return out.shape[1] - ids.shape[1]

    with torch.inference_mode():
        for _ in range(args.warmup):
            decode(encoded[0])
        new_tokens, seconds = 0, 0.0
        for ids in encoded:
            start = time.perf_counter()
            new_tokens += decode(ids)
            seconds += time.perf_counter() - start
    emit(
        {
            "bench": "generate",
            "impl": "pytorch",
            "model": model_name(args.model),
            "threads": torch.get_num_threads(),
            "prompts": len(prompts),
            "new_tokens": new_tokens,
            "tokens_per_s": new_tokens / seconds,
        }
    )


# ---------------------------------------------------------------------------------------------
# attention


def math_attention(q, k, v, causal):
    """softmax(QKᵀ/√d + causal mask) V spelled out in torch ops: the [B, H, N, N] scores are
    materialised, as a naive implementation does."""
    n = q.shape[-2]
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if causal:
        mask = torch.ones(n, n, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def sdpa_attention(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


BACKENDS = {"torch-sdpa": sdpa_attention, "torch-math": math_attention}


def max_rss_mib():
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def attention_child(backend, n, args, conn):
    """One (backend, length) measurement in a fresh process, so ru_maxrss starts from the inputs.
    A run at 16 positions first pages in the kernels' code and starts the thread pool, so the
    reported peak is the attention's working memory, not that fixed start-up cost."""
    torch.set_num_threads(args.threads)
    train = args.mode == "train"
    gen = torch.Generator().manual_seed(0)
    fn = BACKENDS[backend]

    def inputs(length):
        shape = (args.batch, args.heads, length, args.head_dim)
        return [torch.randn(shape, generator=gen).requires_grad_(train) for _ in range(3)]

    def run(q, k, v):
        if train:
            fn(q, k, v, args.causal).sum().backward()
        else:
            with torch.inference_mode():
                fn(q, k, v, args.causal)

    run(*inputs(16))
    q, k, v = inputs(n)
    baseline = max_rss_mib()

    def step():
        run(q, k, v)
        for t in (q, k, v):
            t.grad = None

    seconds = median_seconds(step, args.warmup, args.repeats)
    conn.send({"ms": seconds * 1e3, "peak_mib": max_rss_mib() - baseline})


def cmd_attention(args):
    # Fork before the parent runs any torch op, so no thread pool is inherited half-started.
    ctx = multiprocessing.get_context("fork")
    rows = []
    for backend in BACKENDS:
        for n in args.lengths:
            receive, send = ctx.Pipe(duplex=False)
            child = ctx.Process(target=attention_child, args=(backend, n, args, send))
            child.start()
            send.close()
            # A failed size (out of memory, say) leaves a row without numbers, not a lost run.
            try:
                result = receive.recv()
            except EOFError:  # the child died without sending
                result = None
            child.join()
            if child.exitcode != 0 or result is None:
                result = {"ms": None, "peak_mib": None, "error": f"exit code {child.exitcode}"}
            rows.append({"backend": backend, "seq_len": n, **result})
            print(f"  {backend} N={n}: {result}", file=sys.stderr)
    emit(
        {
            "bench": "attention",
            "impl": "pytorch",
            "threads": args.threads,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "batch": args.batch,
            "causal": args.causal,
            "mode": args.mode,
            "memory": "ru_maxrss rise over the runs, after a priming run and the inputs",
            "rows": rows,
        }
    )


# ---------------------------------------------------------------------------------------------
# machine


def run_text(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def cmd_machine(args):
    """What the results were measured on, for the report's first section."""
    lscpu = {}
    for line in (run_text(["lscpu"]) or "").splitlines():
        key, _, value = line.partition(":")
        lscpu[key.strip()] = value.strip()
    mem_kib = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    os_name = platform.platform()
    if os.path.exists("/etc/os-release"):
        with open("/etc/os-release") as f:
            fields = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
        os_name = fields.get("PRETTY_NAME", os_name).strip('"')
    sockets = int(lscpu.get("Socket(s)", "1") or 1)
    cores = lscpu.get("Core(s) per socket")
    emit(
        {
            "cpu": lscpu.get("Model name"),
            "cores": int(cores) * sockets if cores else None,
            "threads_per_core": lscpu.get("Thread(s) per core"),
            "nproc": os.cpu_count() if args.nproc is None else args.nproc,
            "memory_gib": round(mem_kib / 2**20, 1) if mem_kib else None,
            "os": os_name,
            "kernel": platform.release(),
            "rustc": run_text(["rustc", "--version"]),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": args.threads,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        }
    )


# ---------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-models", help="write the random-weight HF folders")
    p.add_argument("out_dir")
    p.add_argument("--force", action="store_true", help="rewrite folders that exist")
    p.set_defaults(run=cmd_make_models, threads=None)

    def common(p, warmup=1):
        p.add_argument("--threads", type=int, default=os.cpu_count())
        p.add_argument("--warmup", type=int, default=warmup)

    p = sub.add_parser("embed", help="images/s and texts/s of CLIP or SigLIP")
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    common(p)
    p.set_defaults(run=cmd_embed)

    p = sub.add_parser("train-step", help="samples/s of a contrastive training step")
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    common(p)
    p.set_defaults(run=cmd_train_step)

    p = sub.add_parser("caption", help="ms per greedy BLIP caption")
    p.add_argument("--model", required=True)
    p.add_argument("--images", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=20)
    common(p)
    p.set_defaults(run=cmd_caption)

    p = sub.add_parser("generate", help="tokens/s of greedy Llama decoding")
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help="a file of prompts, one per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    common(p)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("attention", help="time and RSS peak of SDPA and explicit attention")
    p.add_argument(
        "--lengths",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[256, 512, 1024, 2048, 4096],
    )
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--mode", choices=["forward", "train"], default="forward")
    p.add_argument("--repeats", type=int, default=5)
    common(p)
    p.set_defaults(run=cmd_attention)

    p = sub.add_parser("machine", help="describe this machine as JSON")
    p.add_argument("--threads", type=int, default=None, help="the threads the benchmarks use")
    p.add_argument("--nproc", type=int, default=None)
    p.set_defaults(run=cmd_machine)

    args = parser.parse_args()
    check_versions()
    if args.command not in ("make-models", "machine", "attention"):
        torch.set_num_threads(args.threads)
    args.run(args)


if __name__ == "__main__":
    main()
