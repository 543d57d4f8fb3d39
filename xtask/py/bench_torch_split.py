#!/usr/bin/env python3
"""PyTorch side of `cargo xtask bench train`: one configuration per process.

Builds the models exactly as ../shared/ref/bench_torch.py does (it is imported from --ref and its
`setup`, `build_decoder` and step definitions are reused), then times the same step split into
its parts so that each part can be compared with the Rust side:

  decoder configs (a, b, d): forward (eval, inference_mode) and a train step split into
      forward + loss, backward, AdamW.step (zero_grad(set_to_none=True) counts with backward)
  encoder config (c):        forward (train mode) + mean(out * w), then backward

Prints one JSON object: medians in seconds, tokens per step and the process's peak resident
memory (ru_maxrss) at the end, which is the peak of this configuration alone.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time


def median_parts(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    rows = [fn() for _ in range(steps)]
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}, rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", required=True, help="folder holding bench_torch.py")
    ap.add_argument("--config", required=True, choices=["a", "b", "c", "d", "quick"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, args.ref)
    import torch
    import torch.nn.functional as F
    import bench_torch as bt
    from torchscale.architecture.config import DecoderConfig
    from torchscale.architecture.decoder import Decoder
    from torchscale.component.embedding import PositionalEmbedding, TextEmbedding

    torch.set_num_threads(args.threads)
    bt.setup()
    torch.manual_seed(0)

    def small_decoder(layers, dim, heads, ffn, vocab):
        cfg = DecoderConfig(vocab_size=vocab, decoder_embed_dim=dim, decoder_attention_heads=heads,
                            decoder_ffn_embed_dim=ffn, decoder_layers=layers,
                            max_target_positions=1024, dropout=0.0, attention_dropout=0.0,
                            activation_dropout=0.0)
        model = Decoder(cfg,
                        embed_tokens=TextEmbedding(cfg.vocab_size, dim, padding_idx=1),
                        embed_positions=PositionalEmbedding(cfg.max_target_positions + 2, dim))
        return model, cfg

    out = {"config": args.config, "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.config in ("a", "b", "d", "quick"):
        if args.config == "a":
            model, cfg = bt.build_decoder(False)
            B, T = 8, 256
        elif args.config == "b":
            model, cfg = bt.build_decoder(True)
            B, T = 8, 256
        elif args.config == "d":
            model, cfg = small_decoder(48, 64, 4, 256, 260)
            B, T = 8, 32
        else:
            model, cfg = small_decoder(2, 32, 2, 64, 260)
            B, T = 2, 16
        toks = torch.randint(4, cfg.vocab_size, (B, T))
        tgt = torch.randint(4, cfg.vocab_size, (B, T))
        model.eval()

        def fwd():
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(toks)
            return {"forward": time.perf_counter() - t0}

        fwd_med, _ = median_parts(fwd, args.warmup, args.steps)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            t0 = time.perf_counter()
            logits, extra = model(toks)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), tgt.view(-1))
            laux = [x for x in extra["l_aux"] if x is not None]
            if laux:
                loss = loss + 0.01 * sum(laux)
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            return {"train_forward": t1 - t0, "train_backward": t2 - t1,
                    "train_optimizer": t3 - t2, "train_step": t3 - t0,
                    "loss": float(loss)}

        med, _ = median_parts(step, args.warmup, args.steps)
        out.update(fwd_med)
        out.update(med)
    else:
        torch.manual_seed(0)
        from torchscale.architecture.config import EncoderConfig
        from torchscale.architecture.encoder import Encoder
        # bench_torch.bench_encoder's model, batch and loss, timed in parts.
        cfg = EncoderConfig(vocab_size=32000, encoder_embed_dim=256, encoder_attention_heads=4,
                            encoder_ffn_embed_dim=1024, encoder_layers=12, deepnorm=True,
                            max_source_positions=1024, dropout=0.0, attention_dropout=0.0,
                            activation_dropout=0.0, no_output_layer=True)
        model = Encoder(cfg,
                        embed_tokens=TextEmbedding(cfg.vocab_size, cfg.encoder_embed_dim, padding_idx=1),
                        embed_positions=PositionalEmbedding(cfg.max_source_positions + 2, cfg.encoder_embed_dim))
        B, T = 16, 128
        toks = torch.randint(4, cfg.vocab_size, (B, T))
        w = torch.randn(B, T, cfg.encoder_embed_dim)
        model.train()

        def fwd_bwd():
            t0 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            o = model(src_tokens=toks)["encoder_out"]
            loss = (o * w).mean()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            return {"train_forward": t1 - t0, "train_backward": t2 - t1, "train_step": t2 - t0,
                    "loss": float(loss)}

        med, _ = median_parts(fwd_bwd, args.warmup, args.steps)
        out.update(med)
    out["tokens"] = B * T
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["pid"] = os.getpid()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
