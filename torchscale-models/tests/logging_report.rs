//! What the examples print and what the library traces: interval means for the log lines,
//! `log.jsonl` records, the summary, printable samples, and the tracing spans a training step
//! and a checkpoint save open.

#[path = "../examples/common/report.rs"]
mod report;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use report::{printable, quoted_block, Interval, StepLog, Summary};
use torchscale_models::config::DecoderConfig;
use torchscale_models::data::BYTE_VOCAB;
use torchscale_models::lm::{LanguageModel, LossConfig};
use torchscale_models::train::{
    AdamWConfig, ClipMode, Schedule, SkipReason, StepReport, Trainer, TrainerConfig,
};

fn step(step: u64, nll: f64, ntokens: usize, grad_norm: f64, clip_coef: f64) -> StepReport {
    StepReport {
        step,
        nll,
        ntokens,
        lr: 1e-3,
        grad_norm,
        clip_coef,
        skipped: None,
    }
}

#[test]
fn the_interval_line_averages_over_its_steps() {
    let mut i = Interval::default();
    i.add(&step(0, 4.0, 100, 2.0, 0.5));
    i.add(&step(1, 2.0, 300, 1.0, 1.0));
    let mut bad = step(2, f64::INFINITY, 100, f64::NAN, 1.0);
    bad.skipped = Some(SkipReason::Loss {
        value: f64::INFINITY,
    });
    i.add(&bad);
    // Token-weighted over the finite steps: (4 * 100 + 2 * 300) / 400.
    assert_eq!(i.mean_loss(), Some(2.5));
    assert_eq!(i.steps(), 3);
    let line = i.line(3, 10, 2e-4, Duration::from_millis(1500));
    assert!(
        line.starts_with("step 3/10 | loss 2.500 | ppl 12.18 | lr 2.000e-4 | tok/s "),
        "{line}"
    );
    // Mean of the two finite norms; one clipped step of three; one skipped.
    assert!(
        line.ends_with("| gnorm 1.500 | clip 33% | skipped 1 | wall 1.5s"),
        "{line}"
    );
    i.reset();
    assert_eq!((i.mean_loss(), i.steps()), (None, 0));
    assert!(i
        .line(3, 10, 0.0, Duration::ZERO)
        .contains("| loss - | ppl - |"));
}

#[test]
fn log_records_are_json_with_null_for_a_non_finite_norm() {
    let mut r = step(4, 1.25, 10, f64::NAN, 1.0);
    r.skipped = Some(SkipReason::GradNorm { value: f64::NAN });
    assert_eq!(
        StepLog::of(&r).to_line(),
        "{\"step\":5,\"loss\":1.25,\"lr\":0.001,\"grad_norm\":null,\"skipped\":true}\n"
    );
}

#[test]
fn the_summary_says_what_was_done() {
    let s = Summary {
        steps: 300,
        skipped: 1,
        tokens: 614_400,
        wall: Duration::from_secs(15),
        train_loss: Some((2.25, 100)),
        valid_loss: Some(2.0),
        per_byte: true,
        checkpoint: Some("runs/train_lm/checkpoint".into()),
    };
    assert_eq!(
        s.to_string(),
        "summary: 300 steps (1 skipped), 614400 tokens in 15.0s, 40960 tokens/s\n\
         \x20 final train loss 2.250 (mean of the last 100 steps)\n\
         \x20 final valid loss 2.000, ppl 7.39, 2.885 bits/byte\n\
         \x20 checkpoint: runs/train_lm/checkpoint\n"
    );
}

#[test]
fn samples_are_made_printable() {
    let raw = b"ok\tline\nESC\x1b[31m DEL\x7f bell\x07 \xc2\x9b \xff caf\xc3\xa9";
    assert_eq!(
        printable(raw),
        "ok\tline\nESC\\x1b[31m DEL\\x7f bell\\x07 \\u{9b} \\xff caf\u{e9}"
    );
    assert_eq!(quoted_block("a\nb"), "  | a\n  | b");
}

/// Records the name of every span opened.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Spans {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _id: &tracing::span::Id,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0
            .lock()
            .unwrap()
            .push(attrs.metadata().name().to_string());
    }
}

#[test]
fn build_forward_backward_step_and_save_are_traced() {
    use tracing_subscriber::layer::SubscriberExt;
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry().with(spans.clone());
    let dir = tempfile::tempdir().unwrap();
    tracing::subscriber::with_default(subscriber, || {
        let cfg = DecoderConfig::default()
            .with_vocab_size(BYTE_VOCAB as i64)
            .with_embed_dim(16)
            .with_heads(2)
            .with_ffn_dim(32)
            .with_layers(1);
        let lm = LanguageModel::new(cfg, 0).unwrap();
        let mut t = Trainer::new(
            &lm.store,
            &[],
            TrainerConfig {
                clip: ClipMode::GlobalNorm(1.0),
                ..TrainerConfig::default()
            },
            AdamWConfig::default(),
            Schedule::Constant(1e-3),
        )
        .unwrap();
        let ids = candle_core::Tensor::new(&[[5u32, 6, 7, 8]], &candle_core::Device::Cpu).unwrap();
        t.step(1, |ctx| {
            lm.micro_batch(&ids, &ids, true, &LossConfig::default(), ctx.seed)
        })
        .unwrap();
        lm.save(&dir.path().join("ckpt"), None).unwrap();
    });
    let seen = spans.0.lock().unwrap().clone();
    for name in [
        "build",
        "train_step",
        "forward",
        "backward",
        "clip",
        "optimizer_step",
        "checkpoint_save",
    ] {
        assert!(
            seen.iter().any(|s| s == name),
            "no `{name}` span in {seen:?}"
        );
    }
}
