//! torchscale's `Encoder`.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use candle_nn::{Linear, VarBuilder};
use torchscale_core::attention::RelativePositionBias;
use torchscale_core::embedding::TokenEmbedding;
use torchscale_core::layer_norm::LayerNorm;
use torchscale_core::linear::apply;
use torchscale_core::{AuxOutput, Branch, Ctx, Error, Multiway, Result, Stabilizer};

use torchscale_core::embedding::check_token_dtype;
use torchscale_core::error::{describe, expect_device, expect_int_mask};

use crate::build::StackPlan;
use crate::decoder::{check_uniforms, name_uniform};
use crate::embed::EmbeddingStage;
use crate::layer::Layer;
use crate::spec::StackSpec;

/// Options of one encoder call.
#[derive(Debug, Default, Clone)]
pub struct EncoderInputs<'a> {
    /// `[B, T]`, integer or boolean (u8), nonzero = padded (torchscale: `encoder_padding_mask`).
    /// None: no padding.
    pub padding_mask: Option<&'a Tensor>,
    /// Optional `[T, T]` mask: nonzero entries are blocked (torchscale adds -1e8 there).
    pub attn_mask: Option<&'a Tensor>,
    /// Return features instead of logits.
    pub features_only: bool,
    /// Collect each layer's output in `encoder_states`.
    pub return_all_hiddens: bool,
    /// Multiway split (torchscale's `multiway_split_position`); anything but [`Branch::A`] is
    /// refused by an encoder that is not multiway, which would ignore it.
    pub branch: Branch,
    /// Training mode.
    pub train: bool,
    /// MoE uniforms, one `[S]` tensor per layer index (None: drawn internally); at most one entry
    /// per layer, and `Some` only for MoE layers.
    pub moe_uniforms: Vec<Option<Tensor>>,
}

/// What `Encoder::forward` returns (torchscale's dict).
#[derive(Debug, Clone)]
pub struct EncoderOutput {
    /// Logits `[B, T, V]` if the encoder has an output projection and not `features_only`,
    /// else features `[B, T, C]` (after the final LayerNorm, if any).
    pub encoder_out: Tensor,
    /// Scaled token embedding, before positions.
    pub encoder_embedding: Tensor,
    /// The padding mask (u8, 1 = padded).
    pub encoder_padding_mask: Tensor,
    /// Embedding output then each layer's output (before the final LayerNorm), if asked.
    pub encoder_states: Vec<Tensor>,
    /// Per layer: the MoE balance loss, None for dense layers.
    pub l_aux: Vec<Option<Tensor>>,
    /// MoE outputs with routing statistics.
    pub aux: Vec<AuxOutput>,
}

/// A Transformer encoder with torchscale's state_dict layout.
#[derive(Debug)]
pub struct Encoder {
    embed: EmbeddingStage,
    layers: Vec<Layer>,
    layer_norm: Option<Multiway<LayerNorm>>,
    relative_position: Option<RelativePositionBias>,
    output_projection: Option<Linear>,
    spec: StackSpec,
    stabilizer: Arc<dyn Stabilizer>,
    stabilizers: Vec<Arc<dyn Stabilizer>>,
}

impl Encoder {
    /// Builds the encoder under `vb` with every layer wired by `stabilizer`.
    /// `in_encoder_decoder` suppresses the output projection.
    pub fn from_spec(
        spec: StackSpec,
        stabilizer: Box<dyn Stabilizer>,
        in_encoder_decoder: bool,
        tokens: Option<TokenEmbedding>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let plan = StackPlan::uniform(Arc::from(stabilizer), spec.layers);
        Self::from_plan(spec, plan, in_encoder_decoder, tokens, vb)
    }

    /// Builds the encoder under `vb` from a [`StackPlan`]: one stabiliser per layer and the
    /// user's hooks. The final LayerNorm exists when the top layer's stabiliser wants one and
    /// `spec.normalize_output`.
    pub fn from_plan(
        spec: StackSpec,
        plan: StackPlan,
        in_encoder_decoder: bool,
        tokens: Option<TokenEmbedding>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vocab = usize::try_from(spec.vocab_size.max(0)).unwrap_or(0);
        if vocab == 0 && tokens.is_none() {
            return Err(Error::config(
                "vocab_size",
                "the encoder needs a vocabulary for its token embedding",
            ));
        }
        let vocab = tokens.as_ref().map(|t| t.vocab_size()).unwrap_or(vocab);
        let embed = EmbeddingStage::new(&spec, spec.multiway, tokens, vocab, vb.clone())?;
        let layers = plan.build_layers(&spec, false, false, &vb)?;
        let layer_norm = if plan.final_norm() && spec.normalize_output {
            Some(Multiway::new(spec.multiway, vb.pp("layer_norm"), |vb| {
                LayerNorm::new(spec.embed_dim, spec.layernorm_eps, vb)
            })?)
        } else {
            None
        };
        let relative_position = if spec.rel_pos() {
            Some(RelativePositionBias::new(
                spec.rel_pos_buckets,
                spec.max_rel_pos,
                spec.heads,
                vb.pp("relative_position"),
            )?)
        } else {
            None
        };
        let wants_projection = !in_encoder_decoder && spec.vocab_size > 0 && !spec.no_output_layer;
        let output_projection = if wants_projection {
            Some(embed.output_projection(&spec, vb.pp("output_projection"))?)
        } else {
            None
        };
        Ok(Self {
            embed,
            layers,
            layer_norm,
            relative_position,
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

    /// The stack's technique (the config's; see [`Encoder::layer_stabilizers`] for a mixed
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
        crate::randomness::reseed_layers(&self.layers, seed, 0);
    }

    /// Every sublayer's work before a training forward, such as the X-MoE gate rescale (see
    /// [`crate::decoder::Decoder::renormalize_gates`]).
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

    /// Encodes `src_tokens: [B, T]`. The inputs are checked first, each error naming its
    /// argument (`src_tokens`, `encoder_padding_mask`, `attn_mask`, `moe_uniforms[i]`,
    /// `branch`); a candle error from the computation comes back as [`Error::Context`] naming
    /// this call and its inputs' shapes.
    pub fn forward(&self, src_tokens: &Tensor, inp: &EncoderInputs) -> Result<EncoderOutput> {
        self.run(src_tokens, inp).map_err(|e| {
            e.in_call(|| {
                let mut args = vec![describe("src_tokens", src_tokens)];
                if let Some(m) = inp.padding_mask {
                    args.push(describe("encoder_padding_mask", m));
                }
                if let Some(m) = inp.attn_mask {
                    args.push(describe("attn_mask", m));
                }
                format!("Encoder::forward({})", args.join(", "))
            })
        })
    }

    /// Every input checked against the model before any work. Returns `(B, T)`.
    fn check_inputs(&self, src_tokens: &Tensor, inp: &EncoderInputs) -> Result<(usize, usize)> {
        let dev = self.embed.tokens.weight().device();
        // The ids' range is checked where they are embedded (one read of their extremes).
        check_token_dtype(src_tokens, "src_tokens")?;
        let (b, t) = match src_tokens.dims() {
            &[b, t] => (b, t),
            got => return Err(Error::shape("src_tokens", "[B, T]", got)),
        };
        expect_device(src_tokens, "src_tokens", dev)?;
        if let Some(m) = inp.padding_mask {
            if m.dims() != [b, t] {
                return Err(Error::shape(
                    "encoder_padding_mask",
                    format!("[{b}, {t}]"),
                    m.dims(),
                ));
            }
            expect_int_mask(m, "encoder_padding_mask")?;
            expect_device(m, "encoder_padding_mask", dev)?;
        }
        if let Some(m) = inp.attn_mask {
            if m.dims() != [t, t] {
                return Err(Error::shape("attn_mask", format!("[{t}, {t}]"), m.dims()));
            }
            expect_device(m, "attn_mask", dev)?;
        }
        if !self.spec.multiway && inp.branch != Branch::A {
            return Err(Error::invalid(
                "branch",
                format!(
                    "{:?} picks a multiway copy, but this encoder has one copy of each module",
                    inp.branch
                ),
            ));
        }
        check_uniforms(&inp.moe_uniforms, &self.layers)?;
        Ok((b, t))
    }

    fn run(&self, src_tokens: &Tensor, inp: &EncoderInputs) -> Result<EncoderOutput> {
        let _span = tracing::trace_span!("forward", model = "Encoder", train = inp.train).entered();
        let (b, t) = self.check_inputs(src_tokens, inp)?;
        let dev = src_tokens.device();
        let mask = match inp.padding_mask {
            Some(m) => m.ne(0u32)?,
            None => Tensor::zeros((b, t), DType::U8, dev)?,
        };
        let (x, embed) =
            self.embed
                .forward_named(src_tokens, "src_tokens", 0, inp.branch, inp.train)?;
        let keep = mask.eq(0u32)?.to_dtype(x.dtype())?.unsqueeze(2)?;
        let mut x = x.broadcast_mul(&keep)?;
        let rel = match &self.relative_position {
            Some(r) => Some(r.forward(t, t, 0)?),
            None => None,
        };
        let attn_mask = match inp.attn_mask {
            Some(m) => {
                let blocked = m.ne(0u32)?;
                let z = Tensor::zeros((t, t), x.dtype(), dev)?;
                Some(blocked.where_cond(&(z.ones_like()? * -1e8)?, &z)?)
            }
            None => None,
        };
        let mut states = Vec::new();
        if inp.return_all_hiddens {
            states.push(x.clone());
        }
        let mut aux = Vec::new();
        let mut l_aux = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let mut ctx = Ctx {
                train: inp.train,
                layer: i,
                branch: inp.branch,
                key_padding_mask: Some(&mask),
                attn_mask: attn_mask.as_ref(),
                rel_pos: rel.as_ref(),
                moe_uniform: inp.moe_uniforms.get(i).and_then(|u| u.as_ref()),
                time_major: true,
                ..Default::default()
            };
            x = layer
                .forward(&x, &mut ctx)
                .map_err(|e| name_uniform(e, i))?;
            l_aux.push(ctx.aux.first().map(|a: &AuxOutput| a.balance_loss.clone()));
            aux.append(&mut ctx.aux);
            if inp.return_all_hiddens {
                states.push(x.clone());
            }
        }
        if let Some(ln) = &self.layer_norm {
            x = ln.apply(&x, inp.branch, |ln, x| ln.forward(x))?;
        }
        let encoder_out = match (&self.output_projection, inp.features_only) {
            (Some(p), false) => apply(p, &x)?,
            _ => x,
        };
        Ok(EncoderOutput {
            encoder_out,
            encoder_embedding: embed,
            encoder_padding_mask: mask,
            encoder_states: states,
            l_aux,
            aux,
        })
    }
}
