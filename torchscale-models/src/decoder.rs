//! torchscale's `Decoder`, with incremental decoding.

use std::sync::Arc;

use candle_core::Tensor;
use candle_nn::{Linear, VarBuilder};
use torchscale_core::attention::{causal_mask, KvCache, RelativePositionBias};
use torchscale_core::embedding::TokenEmbedding;
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

    /// Reorders the batch of every cache (beam search).
    pub fn reorder(&mut self, order: &Tensor) -> Result<()> {
        self.layers.iter_mut().try_for_each(|c| c.reorder(order))
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
    /// Self-attention key padding mask `[B, T]` (torchscale's `self_attn_padding_mask`).
    pub self_attn_padding_mask: Option<&'a Tensor>,
    /// Encoder output, for an encoder-decoder.
    pub memory: Option<Memory<'a>>,
    /// Return features instead of logits.
    pub features_only: bool,
    /// Training mode.
    pub train: bool,
    /// MoE uniforms, one `[S]` tensor per layer index (None: drawn internally).
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

    /// Full-sequence forward of `prev_output_tokens: [B, T]` (causal).
    pub fn forward(
        &self,
        prev_output_tokens: &Tensor,
        inp: &DecoderInputs,
    ) -> Result<DecoderOutput> {
        self.run(prev_output_tokens, inp, None)
    }

    /// Incremental forward: pass the **whole prefix** so far; unless `state.is_first_step`, only its
    /// last token is processed and the output is `[B, 1, V]`.
    pub fn forward_incremental(
        &self,
        prev_output_tokens: &Tensor,
        inp: &DecoderInputs,
        state: &mut IncrementalState,
    ) -> Result<DecoderOutput> {
        if state.layers.len() != self.layers.len() {
            state
                .layers
                .resize_with(self.layers.len(), KvCache::default);
        }
        self.run(prev_output_tokens, inp, Some(state))
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
        let (b, slen) = tokens
            .dims2()
            .map_err(|_| Error::shape("prev_output_tokens", "[B, T]", tokens.dims()))?;
        if slen == 0 {
            return Err(Error::shape(
                "prev_output_tokens",
                "[B, T] with T >= 1",
                tokens.dims(),
            ));
        }
        let first = state.as_ref().map(|s| s.is_first_step).unwrap_or(false);
        let single_step = state.is_some() && !first;
        if let Some(s) = &state {
            let cached = s.len();
            let expect = if single_step { slen - 1 } else { 0 };
            if cached != expect {
                return Err(Error::invalid(
                    "incremental_state",
                    format!("the cache holds {cached} steps but the prefix of {slen} tokens needs {expect}"),
                ));
            }
        }
        let (toks, start) = if single_step {
            (tokens.narrow(1, slen - 1, 1)?, slen - 1)
        } else {
            (tokens.clone(), 0)
        };
        let (mut x, _) = self.embed.forward(&toks, start, Branch::A, inp.train)?;
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
        if let Some(m) = inp.memory {
            let (mb, _, mc) = m.encoder_out.dims3()?;
            if mb != b || mc != self.spec.embed_dim {
                return Err(Error::shape(
                    "encoder_out",
                    format!("[{b}, S, {}]", self.spec.embed_dim),
                    m.encoder_out.dims(),
                ));
            }
        }
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
                cache: state.as_deref_mut().map(|s| &mut s.layers[i]),
                is_first_step: first,
                moe_uniform: inp.moe_uniforms.get(i).and_then(|u| u.as_ref()),
                time_major: false,
                aux: Vec::new(),
            };
            x = layer.forward(&x, &mut ctx)?;
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
