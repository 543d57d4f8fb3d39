//! torchscale's `Decoder`, with incremental decoding.

use std::sync::Arc;

use candle_core::Tensor;
use candle_nn::{Linear, VarBuilder};
use torchscale_core::attention::cache::check_order;
use torchscale_core::attention::{causal_mask, KvCache, RelativePositionBias};
use torchscale_core::embedding::{check_token_dtype, check_token_ids, TokenEmbedding};
use torchscale_core::error::{describe, expect_device, expect_int_mask};
use torchscale_core::layer_norm::LayerNorm;
use torchscale_core::linear::apply;
use torchscale_core::{AuxOutput, Branch, Ctx, Error, Result, Stabilizer};

use crate::build::StackPlan;
use crate::embed::EmbeddingStage;
use crate::layer::Layer;
use crate::spec::StackSpec;

mod segments;
pub use segments::StackShared;

/// torchscale's `incremental_state`: one self-attention cache per layer and the prompt flag.
#[derive(Debug, Clone, Default)]
pub struct IncrementalState {
    /// Per layer, `[B, H, S, d]` keys (before xPos) and values.
    pub layers: Vec<KvCache>,
    /// True: the next call processes its whole input as a prompt (with a causal mask).
    pub is_first_step: bool,
}

impl IncrementalState {
    /// An empty state; with `prompt = true` the first call may take a whole prompt.
    pub fn new(prompt: bool) -> Self {
        Self {
            layers: Vec::new(),
            is_first_step: prompt,
        }
    }

    /// Number of cached time steps.
    pub fn len(&self) -> usize {
        self.layers.first().map(|c| c.len()).unwrap_or(0)
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reorders the batch of every cache (beam search): row `i` becomes old row `order[i]`.
    /// `order` must be u8, u32 or i64, 1-D, with every index below the cached batch size; a bad
    /// one is an error naming `order`, and the state is left as it was.
    pub fn reorder(&mut self, order: &Tensor) -> Result<()> {
        if let Some(b) = self.layers.iter().find_map(|c| c.batch()) {
            check_order(order, "order", b)?;
        }
        let mut layers = self.layers.clone();
        layers.iter_mut().try_for_each(|c| c.reorder(order))?;
        self.layers = layers;
        Ok(())
    }
}

/// The encoder's output as the decoder's cross-attention needs it.
#[derive(Debug, Clone, Copy)]
pub struct Memory<'a> {
    /// `[B, S, C]`.
    pub encoder_out: &'a Tensor,
    /// `[B, S]`, nonzero = padded.
    pub padding_mask: Option<&'a Tensor>,
}

/// Options of one decoder call.
#[derive(Debug, Default, Clone)]
pub struct DecoderInputs<'a> {
    /// Self-attention key padding mask `[B, T]` (torchscale's `self_attn_padding_mask`), integer
    /// or boolean (u8), nonzero = padded; in incremental decoding it covers the whole prefix.
    pub self_attn_padding_mask: Option<&'a Tensor>,
    /// Encoder output, for an encoder-decoder; refused by a decoder without cross-attention,
    /// which would ignore it.
    pub memory: Option<Memory<'a>>,
    /// Return features instead of logits.
    pub features_only: bool,
    /// Training mode.
    pub train: bool,
    /// MoE uniforms, one `[S]` tensor per layer index (None: drawn internally). At most one entry
    /// per layer, and `Some` only for MoE layers: uniforms that would be ignored are refused.
    pub moe_uniforms: Vec<Option<Tensor>>,
}

/// What `Decoder::forward` returns: torchscale's `(x, extra)`.
#[derive(Debug, Clone)]
pub struct DecoderOutput {
    /// Logits `[B, T, V]`, or features when `features_only`.
    pub x: Tensor,
    /// Embedding output then each layer's output (before the final LayerNorm).
    pub inner_states: Vec<Tensor>,
    /// Per layer: the MoE balance loss, None for dense layers.
    pub l_aux: Vec<Option<Tensor>>,
    /// MoE outputs with routing statistics.
    pub aux: Vec<AuxOutput>,
}

/// A Transformer decoder with torchscale's state_dict layout.
#[derive(Debug)]
pub struct Decoder {
    embed: EmbeddingStage,
    layers: Vec<Layer>,
    layer_norm: Option<LayerNorm>,
    self_rel: Option<RelativePositionBias>,
    cross_rel: Option<RelativePositionBias>,
    output_projection: Option<Linear>,
    cross_attention: bool,
    spec: StackSpec,
    stabilizer: Arc<dyn Stabilizer>,
    stabilizers: Vec<Arc<dyn Stabilizer>>,
}

impl Decoder {
    /// Builds the decoder under `vb` with every layer wired by `stabilizer`;
    /// `is_encoder_decoder` adds cross-attention.
    pub fn from_spec(
        spec: StackSpec,
        stabilizer: Box<dyn Stabilizer>,
        is_encoder_decoder: bool,
        tokens: Option<TokenEmbedding>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let plan = StackPlan::uniform(Arc::from(stabilizer), spec.layers);
        Self::from_plan(spec, plan, is_encoder_decoder, tokens, vb)
    }

    /// Builds the decoder under `vb` from a [`StackPlan`]: one stabiliser per layer and the
    /// user's hooks. The final LayerNorm exists when the top layer's stabiliser wants one.
    pub fn from_plan(
        spec: StackSpec,
        plan: StackPlan,
        is_encoder_decoder: bool,
        tokens: Option<TokenEmbedding>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vocab = usize::try_from(spec.vocab_size.max(0)).unwrap_or(0);
        if vocab == 0 && tokens.is_none() {
            return Err(Error::config(
                "vocab_size",
                "the decoder needs a vocabulary for its token embedding",
            ));
        }
        let vocab = tokens.as_ref().map(|t| t.vocab_size()).unwrap_or(vocab);
        let embed = EmbeddingStage::new(&spec, false, tokens, vocab, vb.clone())?;
        let layers = plan.build_layers(&spec, is_encoder_decoder, true, &vb)?;
        let layer_norm = if plan.final_norm() {
            Some(LayerNorm::new(
                spec.embed_dim,
                spec.layernorm_eps,
                vb.pp("layer_norm"),
            )?)
        } else {
            None
        };
        let (self_rel, cross_rel) = if spec.rel_pos() {
            let mk = |name: &str| {
                RelativePositionBias::new(
                    spec.rel_pos_buckets,
                    spec.max_rel_pos,
                    spec.heads,
                    vb.pp(name),
                )
            };
            let cross = if is_encoder_decoder {
                Some(mk("cross_attn_relative_position")?)
            } else {
                None
            };
            (Some(mk("self_attn_relative_position")?), cross)
        } else {
            (None, None)
        };
        let output_projection = if spec.vocab_size > 0 && !spec.no_output_layer {
            Some(embed.output_projection(&spec, vb.pp("output_projection"))?)
        } else {
            None
        };
        Ok(Self {
            embed,
            layers,
            layer_norm,
            self_rel,
            cross_rel,
            output_projection,
            cross_attention: is_encoder_decoder,
            spec,
            stabilizer: plan.stabilizer,
            stabilizers: plan.layers,
        })
    }

    /// The stack description.
    pub fn spec(&self) -> &StackSpec {
        &self.spec
    }

    /// The stack's technique (the config's; see [`Decoder::layer_stabilizers`] for a mixed
    /// stack).
    pub fn stabilizer(&self) -> &dyn Stabilizer {
        self.stabilizer.as_ref()
    }

    /// The stabiliser of each layer, bottom first.
    pub fn layer_stabilizers(&self) -> &[Arc<dyn Stabilizer>] {
        &self.stabilizers
    }

    /// True when the layers have cross-attention (an encoder-decoder's decoder), so that a
    /// [`Memory`] may be passed.
    pub fn has_cross_attention(&self) -> bool {
        self.cross_attention
    }

    /// The layers.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The token embedding.
    pub fn embed_tokens(&self) -> &TokenEmbedding {
        &self.embed.tokens
    }

    /// Reseeds every random draw of the next forward passes on this thread (dropout masks and the
    /// MoE routers' second-expert draws), so that a training step is reproducible from `seed`.
    pub fn reseed(&self, seed: u64) {
        crate::randomness::reseed_layers(&self.layers, seed, 1048576);
    }

    /// Every sublayer's work before a training forward ([`Sublayer::prepare_step`]): X-MoE
    /// rescales its gate's `wg` rows to norm 1.5 in place, as torchscale does before each
    /// forward; call it before each training forward to follow torchscale's training dynamics.
    ///
    /// [`Sublayer::prepare_step`]: torchscale_core::Sublayer::prepare_step
    pub fn renormalize_gates(&self) -> Result<()> {
        crate::randomness::prepare_layers(&self.layers)
    }

    /// The parameters of this stack's MoE experts (empty for a dense stack).
    pub fn expert_parameters(&self) -> Vec<Tensor> {
        crate::randomness::expert_parameters(&self.layers)
    }

    /// Non-trainable tensors torchscale keeps in its state_dict (xPos scales), by key.
    pub fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        crate::checkpoint::layer_buffers(&self.layers, "")
    }

    /// Full-sequence forward of `prev_output_tokens: [B, T]` (causal). The inputs are checked
    /// first, each error naming its argument (see [`DecoderInputs`]); a candle error from the
    /// computation comes back as [`Error::Context`] naming this call and its inputs' shapes.
    pub fn forward(
        &self,
        prev_output_tokens: &Tensor,
        inp: &DecoderInputs,
    ) -> Result<DecoderOutput> {
        self.run(prev_output_tokens, inp, None)
            .map_err(|e| e.in_call(|| self.call("forward", prev_output_tokens, inp)))
    }

    /// Incremental forward: pass the **whole prefix** so far; unless `state.is_first_step`, only its
    /// last token is processed and the output is `[B, 1, V]`.
    ///
    /// A fresh state (no layer caches) is filled in; any other must come from this decoder on
    /// this batch: one cache per layer, each `[B, H, S, d]` with this model's heads and head
    /// width, and `S` one less than the prefix (0 on a first step). A state that does not fit
    /// is an error naming `incremental_state`, never resized or reset.
    pub fn forward_incremental(
        &self,
        prev_output_tokens: &Tensor,
        inp: &DecoderInputs,
        state: &mut IncrementalState,
    ) -> Result<DecoderOutput> {
        self.run(prev_output_tokens, inp, Some(state))
            .map_err(|e| e.in_call(|| self.call("forward_incremental", prev_output_tokens, inp)))
    }

    /// `Decoder::forward(prev_output_tokens [2, 7] u32, encoder_out [2, 5, 16] f32)`.
    fn call(&self, name: &str, tokens: &Tensor, inp: &DecoderInputs) -> String {
        let mut args = vec![describe("prev_output_tokens", tokens)];
        if let Some(m) = inp.self_attn_padding_mask {
            args.push(describe("self_attn_padding_mask", m));
        }
        if let Some(m) = inp.memory {
            args.push(describe("encoder_out", m.encoder_out));
        }
        format!("Decoder::{name}({})", args.join(", "))
    }

    /// Every input checked against the model before any work, so that each error names the
    /// argument at fault rather than a candle op. Returns `(B, T)`.
    pub(crate) fn check_inputs(
        &self,
        tokens: &Tensor,
        inp: &DecoderInputs,
        state: Option<&IncrementalState>,
    ) -> Result<(usize, usize)> {
        let table = self.embed.tokens.weight();
        let (dtype, dev) = (table.dtype(), table.device());
        // The ids' range is checked where they are embedded (one read of their extremes).
        check_token_dtype(tokens, "prev_output_tokens")?;
        let (b, slen) = match tokens.dims() {
            &[b, t] if t >= 1 => (b, t),
            got => {
                return Err(Error::shape(
                    "prev_output_tokens",
                    "[B, T] with T >= 1",
                    got,
                ))
            }
        };
        expect_device(tokens, "prev_output_tokens", dev)?;
        if let Some(m) = inp.self_attn_padding_mask {
            if m.dims() != [b, slen] {
                let what = "self_attn_padding_mask";
                return Err(Error::shape(
                    what,
                    format!("[{b}, {slen}] (as prev_output_tokens)"),
                    m.dims(),
                ));
            }
            expect_int_mask(m, "self_attn_padding_mask")?;
            expect_device(m, "self_attn_padding_mask", dev)?;
        }
        if let Some(m) = inp.memory {
            if !self.cross_attention {
                return Err(Error::invalid(
                    "encoder_out",
                    "this decoder has no cross-attention (decoder-only); the memory would be ignored",
                ));
            }
            let c = self.spec.embed_dim;
            let s = match m.encoder_out.dims() {
                &[mb, s, mc] if mb == b && mc == c => s,
                got => {
                    return Err(Error::shape(
                        "encoder_out",
                        format!("[{b}, S, {c}] (batch of prev_output_tokens, model width)"),
                        got,
                    ))
                }
            };
            if m.encoder_out.dtype() != dtype {
                return Err(Error::DType {
                    what: "encoder_out".into(),
                    expected: dtype,
                    got: m.encoder_out.dtype(),
                });
            }
            expect_device(m.encoder_out, "encoder_out", dev)?;
            if let Some(pm) = m.padding_mask {
                if pm.dims() != [b, s] {
                    return Err(Error::shape(
                        "encoder_padding_mask",
                        format!("[{b}, {s}] (as encoder_out)"),
                        pm.dims(),
                    ));
                }
                expect_int_mask(pm, "encoder_padding_mask")?;
                expect_device(pm, "encoder_padding_mask", dev)?;
            }
        }
        check_uniforms(&inp.moe_uniforms, &self.layers)?;
        if let Some(st) = state {
            self.check_state(st, b, slen, dtype)?;
        }
        Ok((b, slen))
    }

    /// A state is fresh (no caches) or this model's: one cache per layer, each fitting its
    /// layer's self-attention, all holding the steps the prefix implies.
    fn check_state(
        &self,
        st: &IncrementalState,
        b: usize,
        slen: usize,
        dtype: candle_core::DType,
    ) -> Result<()> {
        if st.layers.is_empty() && st.is_first_step {
            return Ok(());
        }
        let expect = if st.is_first_step { 0 } else { slen - 1 };
        if st.layers.is_empty() {
            if expect == 0 {
                return Ok(());
            }
            return Err(Error::invalid(
                "incremental_state",
                format!("the cache holds 0 steps but the prefix of {slen} tokens needs {expect}"),
            ));
        }
        if st.layers.len() != self.layers.len() {
            return Err(Error::invalid(
                "incremental_state",
                format!(
                    "holds caches for {} layers but this decoder has {}",
                    st.layers.len(),
                    self.layers.len()
                ),
            ));
        }
        for (i, (cache, layer)) in st.layers.iter().zip(&self.layers).enumerate() {
            let what = format!("incremental_state.layers[{i}]");
            let cached = match layer.self_attn() {
                Some(a) => {
                    let cfg = a.config();
                    let h = cfg.num_heads;
                    cache.check(&what, b, h, cfg.embed_dim / h, dtype)?
                }
                None => cache.len(),
            };
            if cached != expect {
                let when = if st.is_first_step {
                    "a first step needs an empty cache".to_string()
                } else {
                    format!("the prefix of {slen} tokens needs {expect}")
                };
                return Err(Error::invalid(
                    "incremental_state",
                    format!("layers[{i}] holds {cached} steps but {when}"),
                ));
            }
        }
        Ok(())
    }

    fn run(
        &self,
        tokens: &Tensor,
        inp: &DecoderInputs,
        mut state: Option<&mut IncrementalState>,
    ) -> Result<DecoderOutput> {
        let _span = tracing::trace_span!(
            "forward",
            model = "Decoder",
            train = inp.train,
            incremental = state.is_some()
        )
        .entered();
        let (_, slen) = self.check_inputs(tokens, inp, state.as_deref())?;
        let first = state.as_ref().map(|s| s.is_first_step).unwrap_or(false);
        let single_step = state.is_some() && !first;
        if let Some(s) = state.as_deref_mut() {
            if s.layers.is_empty() {
                s.layers.resize_with(self.layers.len(), KvCache::default);
            }
        }
        if single_step {
            // Only the last token is embedded; the rest of the prefix is checked here so that a
            // bad id anywhere is reported where the caller put it.
            check_token_ids(tokens, "prev_output_tokens", self.embed.tokens.vocab_size())?;
        }
        let (toks, start) = if single_step {
            (tokens.narrow(1, slen - 1, 1)?, slen - 1)
        } else {
            (tokens.clone(), 0)
        };
        let (mut x, _) =
            self.embed
                .forward_named(&toks, "prev_output_tokens", start, Branch::A, inp.train)?;
        let t = toks.dim(1)?;
        let dev = tokens.device();
        let (self_rel, cross_rel) = {
            let q0 = if single_step { slen - 1 } else { 0 };
            let s = match &self.self_rel {
                Some(r) => Some(r.forward(t, slen, q0)?),
                None => None,
            };
            let c = match (&self.cross_rel, inp.memory) {
                (Some(r), Some(m)) => Some(r.forward(t, m.encoder_out.dim(1)?, q0)?),
                _ => None,
            };
            (s, c)
        };
        let mask = if single_step {
            None
        } else {
            Some(causal_mask(t, dev)?.to_dtype(x.dtype())?)
        };
        let mut inner_states = vec![x.clone()];
        let mut aux = Vec::new();
        let mut l_aux = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let mut ctx = Ctx {
                train: inp.train,
                layer: i,
                branch: Branch::A,
                key_padding_mask: inp.self_attn_padding_mask,
                attn_mask: mask.as_ref(),
                rel_pos: self_rel.as_ref(),
                memory: inp.memory.map(|m| m.encoder_out),
                memory_padding_mask: inp.memory.and_then(|m| m.padding_mask),
                cross_rel_pos: cross_rel.as_ref(),
                cache: state.as_deref_mut().and_then(|s| s.layers.get_mut(i)),
                is_first_step: first,
                moe_uniform: inp.moe_uniforms.get(i).and_then(|u| u.as_ref()),
                time_major: false,
                aux: Vec::new(),
            };
            x = layer
                .forward(&x, &mut ctx)
                .map_err(|e| name_uniform(e, i))?;
            l_aux.push(ctx.aux.first().map(|a: &AuxOutput| a.balance_loss.clone()));
            aux.append(&mut ctx.aux);
            inner_states.push(x.clone());
        }
        if let Some(s) = state {
            s.is_first_step = false;
        }
        if let Some(ln) = &self.layer_norm {
            x = ln.forward(&x)?;
        }
        if !inp.features_only {
            let p = self.output_projection.as_ref().ok_or_else(|| {
                Error::config(
                    "no_output_layer",
                    "logits asked of a decoder without an output projection",
                )
            })?;
            x = apply(p, &x)?;
        }
        Ok(DecoderOutput {
            x,
            inner_states,
            l_aux,
            aux,
        })
    }
}

/// `moe_uniforms` has at most one entry per layer, and `Some` only where a layer routes: the
/// others would never be read.
pub(crate) fn check_uniforms(uniforms: &[Option<Tensor>], layers: &[Layer]) -> Result<()> {
    if uniforms.len() > layers.len() {
        return Err(Error::invalid(
            "moe_uniforms",
            format!(
                "{} entries for a stack of {} layers",
                uniforms.len(),
                layers.len()
            ),
        ));
    }
    for (i, (u, layer)) in uniforms.iter().zip(layers).enumerate() {
        if let Some(u) = u {
            if layer.moe().is_none() {
                return Err(Error::invalid(
                    format!("moe_uniforms[{i}]"),
                    format!(
                        "layer {i} has no MoE layer, so {} would be ignored",
                        describe("the uniforms", u)
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The router checks the uniforms' shape against the tokens it routes, as `uniform`; at the
/// stack's boundary the argument is `moe_uniforms[i]`.
pub(crate) fn name_uniform(e: Error, layer: usize) -> Error {
    match e {
        Error::Shape {
            what,
            expected,
            got,
        } if what == "uniform" => Error::Shape {
            what: format!("moe_uniforms[{layer}]"),
            expected,
            got,
        },
        other => other,
    }
}
