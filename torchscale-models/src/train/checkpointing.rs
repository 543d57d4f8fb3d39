//! Activation checkpointing (fairscale's `checkpoint_wrapper`): the forward pass keeps only the
//! input of each segment of `k` layers, and the backward pass recomputes one segment at a time
//! from its saved input and hands the gradient down segment by segment.
//!
//! candle has no autograd hooks, so the backward pass is assembled by hand. Each segment runs on
//! a detached input and only its detached output is kept, which frees the segment's graph. The
//! head (final norm, projection, loss) runs on the top output made a leaf [`Var`], whose
//! `backward()` gives the head's parameter gradients and `g = dL/dx_L`. Then, top segment first,
//! the segment is recomputed on its input made a leaf, and `sum(y * g)` (plus the segment's share
//! of the MoE balance loss) is differentiated: that gives the segment's parameter gradients and
//! the `g` of its input. The embedding ends it with `sum(x_0 * g)`.
//!
//! A recomputed segment must draw what the forward drew: the dropout generator is restored to its
//! state at the segment's start ([`dropout_state`]), and the segment's layers are reseeded with
//! their per-step seeds (what [`Decoder::reseed`] gives them, so an MoE router's second-expert
//! draws repeat). A sublayer that draws randomness without honouring [`Sublayer::reseed`] would
//! not be reproduced.
//!
//! Peak activation memory falls from every intermediate of every layer to one tensor `[B, T, C]`
//! per segment plus one segment's intermediates; the price is a second forward of every layer.
//!
//! [`Sublayer::reseed`]: torchscale_core::Sublayer::reseed

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, TensorId, Var};
use torchscale_core::dropout::{dropout_state, restore_dropout, DropoutState};
use torchscale_core::embedding::{check_token_dtype, check_token_ids};
use torchscale_core::error::describe;
use torchscale_core::{AuxOutput, Error, Result};

use super::{label_smoothed_cross_entropy, moe_balance_loss, AuxCombine, MicroBatch};
use crate::data::PAD;
use crate::decoder::{Decoder, DecoderInputs, Memory};
use crate::lm::{rename_arg, LanguageModel, LossConfig};

/// The loss a checkpointed backward differentiates, as the caller's head closure returns it.
#[derive(Debug, Clone)]
pub struct HeadLoss {
    /// A scalar loss of the head's output (logits, or features when `features_only`), with its
    /// graph.
    pub loss: Tensor,
    /// The weight of every MoE balance loss (each [`AuxOutput::balance_loss`]) in the total:
    /// the differentiated loss is `loss + aux_weight * sum(balance losses)`.
    pub aux_weight: f64,
}

/// What [`Decoder::backward_checkpointed`] returns.
#[derive(Debug)]
pub struct CheckpointedBackward {
    /// The gradient of the total loss for every parameter that has one (only parameters: no
    /// activation's gradient is kept).
    pub grads: GradStore,
    /// The total loss, `loss + aux_weight * sum(balance losses)`, detached.
    pub loss: Tensor,
    /// The forward pass's auxiliary outputs (MoE balance losses, routing), detached and without
    /// the routed rows (`input`, `output`), which would keep two activations per MoE layer.
    pub aux: Vec<AuxOutput>,
    /// The gradient of the encoder output, when the call had one (`inp.memory`): an
    /// encoder-decoder continues its backward pass with `sum(encoder_out * memory_grad)`.
    pub memory_grad: Option<Tensor>,
}

impl Decoder {
    /// The parameter gradients of a full-sequence training call with activation checkpointing,
    /// segments of `every_k_layers` layers (the last may be shorter).
    ///
    /// `head_loss` gets the head's output and the forward's auxiliary outputs and returns the
    /// loss to differentiate. With `inp.train` the decoder is first reseeded from `seed`, so that
    /// the call equals `decoder.reseed(seed)`, [`Decoder::forward`], then `backward()` of
    /// `loss + aux_weight * sum(balance losses)`, to float rounding. Incremental state is not
    /// supported (this is for training).
    pub fn backward_checkpointed<F>(
        &self,
        tokens: &Tensor,
        inp: &DecoderInputs,
        every_k_layers: usize,
        seed: u64,
        head_loss: F,
    ) -> Result<CheckpointedBackward>
    where
        F: FnOnce(&Tensor, &[AuxOutput]) -> Result<HeadLoss>,
    {
        if every_k_layers == 0 {
            return Err(Error::config(
                "checkpoint_activations",
                "a segment holds at least 1 layer",
            ));
        }
        self.check_inputs(tokens, inp, None)?;
        let n = self.layers().len();
        let segments: Vec<Range<usize>> = (0..n)
            .step_by(every_k_layers)
            .map(|a| a..(a + every_k_layers).min(n))
            .collect();
        let _span =
            tracing::debug_span!("checkpointed_backward", segments = segments.len()).entered();
        if inp.train {
            self.reseed(seed);
        }
        // The encoder output as a leaf: its gradient is summed over the segments instead of
        // running the encoder's backward once per segment.
        let memory_leaf = match inp.memory {
            Some(m) => Some(Var::from_tensor(&m.encoder_out.detach())?),
            None => None,
        };
        let run_inp = DecoderInputs {
            self_attn_padding_mask: inp.self_attn_padding_mask,
            memory: match (inp.memory, &memory_leaf) {
                (Some(m), Some(leaf)) => Some(Memory {
                    encoder_out: leaf.as_tensor(),
                    padding_mask: m.padding_mask,
                }),
                _ => None,
            },
            features_only: inp.features_only,
            train: inp.train,
            moe_uniforms: inp.moe_uniforms.clone(),
        };

        // Forward: keep each segment's detached input and its dropout state, nothing else.
        let x0 = self.forward_embed(tokens, inp.train)?;
        let shared = self.stack_shared(&x0, &run_inp)?;
        let mut saved: Vec<(Tensor, Option<DropoutState>)> = Vec::with_capacity(segments.len());
        let mut aux_all = Vec::new();
        let mut x = x0.detach();
        for r in &segments {
            let state = inp.train.then(dropout_state);
            let (y, aux) = self.forward_layers(&x, r.clone(), &run_inp, &shared)?;
            aux_all.extend(aux.into_iter().map(detach_aux));
            saved.push((x, state));
            x = y.detach();
        }
        let after_forward = inp.train.then(dropout_state);

        // Head: its parameter gradients and g = dL/dx_L.
        let top = Var::from_tensor(&x)?;
        drop(x);
        let HeadLoss { loss, aux_weight } = {
            let out = self.forward_head(top.as_tensor(), run_inp.features_only)?;
            head_loss(&out, &aux_all)?
        };
        let mut total = loss.detach();
        for a in &aux_all {
            let l = a.balance_loss.to_dtype(total.dtype())?.sum_all()?;
            total = total.broadcast_add(&(l * aux_weight)?)?;
        }
        let vars = variables(&loss);
        let mut grads = loss.backward()?;
        drop(loss);
        let mut g = take_grad(&mut grads, top.as_tensor())?;
        drop(top);
        let mut acc = GradStore::default();
        absorb(&mut acc, grads, &vars)?;

        // Segments, top first: recompute from the saved input and pass the gradient down.
        let mut memory_grad: Option<Tensor> = None;
        for r in segments.iter().rev() {
            let (x_in, state) = saved.pop().ok_or_else(|| {
                Error::invalid("checkpointing", "a segment's saved input is missing")
            })?;
            if let Some(s) = &state {
                restore_dropout(s);
            }
            if inp.train {
                for i in r.clone() {
                    self.reseed_layer(i, seed);
                }
            }
            let leaf = Var::from_tensor(&x_in)?;
            drop(x_in);
            let (y, aux) = self.forward_layers(leaf.as_tensor(), r.clone(), &run_inp, &shared)?;
            // The surrogate's gradient in y is exactly g; summed in f32 whatever the dtype.
            let mut surrogate = (y * &g)?.sum_all()?.to_dtype(DType::F32)?;
            if aux_weight != 0.0 {
                for a in &aux {
                    let l = a.balance_loss.to_dtype(DType::F32)?.sum_all()?;
                    surrogate = (surrogate + (l * aux_weight)?)?;
                }
            }
            drop(aux);
            let vars = variables(&surrogate);
            let mut grads = surrogate.backward()?;
            drop(surrogate);
            g = take_grad(&mut grads, leaf.as_tensor())?;
            if let Some(m) = &memory_leaf {
                if let Some(mg) = grads.remove(m.as_tensor()) {
                    let mg = mg.detach();
                    memory_grad = Some(match memory_grad {
                        Some(sum) => (sum + mg)?,
                        None => mg,
                    });
                }
            }
            absorb(&mut acc, grads, &vars)?;
        }

        // Embedding: x_0 kept its (small) graph.
        let surrogate = (x0 * &g)?.sum_all()?.to_dtype(DType::F32)?;
        let vars = variables(&surrogate);
        absorb(&mut acc, surrogate.backward()?, &vars)?;
        // Later draws of this thread continue where the plain forward would have left them.
        if let Some(s) = &after_forward {
            restore_dropout(s);
        }
        Ok(CheckpointedBackward {
            grads: acc,
            loss: total,
            aux: aux_all,
            memory_grad,
        })
    }
}

impl LanguageModel {
    /// [`LanguageModel::micro_batch`] with activation checkpointing, segments of
    /// `every_k_layers` layers: the gradients are computed here (the returned
    /// [`MicroBatch::grads`]), keeping one `[B, T, C]` activation per segment instead of every
    /// intermediate, at the cost of a second forward of every layer. The loss and gradients
    /// equal the plain call's to float rounding.
    pub fn micro_batch_checkpointed(
        &self,
        input: &Tensor,
        target: &Tensor,
        train: bool,
        loss: &LossConfig,
        seed: u64,
        every_k_layers: usize,
    ) -> Result<MicroBatch> {
        // The plain call's checks, so that both refuse the same inputs with the same errors.
        check_token_dtype(input, "input")?;
        check_token_ids(target, "target", self.model.embed_tokens().vocab_size())?;
        if target.dims() != input.dims() {
            return Err(Error::shape(
                "target",
                format!("{:?} (the shape of input)", input.dims()),
                target.dims(),
            ));
        }
        if train {
            self.model.renormalize_gates()?;
        }
        let inp = DecoderInputs {
            train,
            ..Default::default()
        };
        let mut head = None;
        let out = self
            .model
            .backward_checkpointed(input, &inp, every_k_layers, seed, |logits, aux| {
                let ce =
                    label_smoothed_cross_entropy(logits, target, loss.label_smoothing, Some(PAD))?;
                // fairseq's MoE criterion: weight * ntokens * mean over the layers' losses.
                let aux_weight = if aux.is_empty() {
                    0.0
                } else {
                    loss.moe_loss_weight * ce.ntokens as f64 / aux.len() as f64
                };
                head = Some((ce.loss_sum.detach(), ce.nll_sum.detach(), ce.ntokens));
                Ok(HeadLoss {
                    loss: ce.loss_sum,
                    aux_weight,
                })
            })
            .map_err(|e| rename_arg(e, |w| (w == "prev_output_tokens").then(|| "input".into())))
            .map_err(|e| {
                e.in_call(|| {
                    format!(
                        "LanguageModel::micro_batch_checkpointed({}, {})",
                        describe("input", input),
                        describe("target", target)
                    )
                })
            })?;
        let (mut loss_sum, nll_sum, ntokens) =
            head.ok_or_else(|| Error::invalid("checkpointing", "the head loss was not computed"))?;
        // The reported loss is assembled as the plain call assembles it, from the same values.
        let aux: Vec<Tensor> = out.aux.iter().map(|a| a.balance_loss.clone()).collect();
        if let Some(b) = moe_balance_loss(&aux, loss.moe_loss_weight, AuxCombine::Average)? {
            loss_sum = (loss_sum + (b * ntokens as f64)?)?;
        }
        Ok(MicroBatch {
            loss_sum,
            nll_sum: nll_sum.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            ntokens,
            grads: Some(Arc::new(out.grads)),
        })
    }
}

/// Removes and returns `leaf`'s gradient from `grads` (detached); zeros when nothing depended
/// on it.
fn take_grad(grads: &mut GradStore, leaf: &Tensor) -> Result<Tensor> {
    match grads.remove(leaf) {
        Some(g) => Ok(g.detach()),
        None => Ok(leaf.zeros_like()?),
    }
}

/// The variables `loss` depends on (the parameters, and any leaf made here).
fn variables(loss: &Tensor) -> HashSet<TensorId> {
    loss.sorted_nodes()
        .into_iter()
        .filter(|t| t.is_variable())
        .map(|t| t.id())
        .collect()
}

/// Adds the gradients of `vars` from one backward pass into `acc`, detached. candle's store
/// also holds a gradient for every untracked operand of the graph (each dropout mask, the
/// attention mask), and a variable's gradient stays in the graph of the forward tensors it was
/// computed from (a weight's is `x^T . grad`): keeping either would keep the segment's
/// activations alive.
fn absorb(acc: &mut GradStore, grads: GradStore, vars: &HashSet<TensorId>) -> Result<()> {
    for &id in vars {
        let Some(g) = grads.get_id(id) else { continue };
        let g = g.detach();
        let sum = match acc.get_id(id) {
            Some(a) => (a + g)?,
            None => g,
        };
        acc.insert_id(id, sum);
    }
    Ok(())
}

/// `a` cut from the graph: the routed rows are dropped and every other tensor detached, so that
/// holding the forward's auxiliary outputs keeps no segment's graph alive.
fn detach_aux(mut a: AuxOutput) -> AuxOutput {
    a.balance_loss = a.balance_loss.detach();
    a.input = None;
    a.output = None;
    if let Some(r) = a.routing.as_mut() {
        r.gate = r.gate.detach();
        r.logits = r.logits.detach();
        r.probs = r.probs.detach();
        r.balance_loss = r.balance_loss.detach();
    }
    a
}
