//! One Transformer layer: self-attention, optional cross-attention, FFN or MoE, each joined to the
//! stream by the technique's [`Residual`].

use candle_core::Tensor;
use candle_nn::VarBuilder;
use torchscale_core::attention::{
    AttentionConfig, AttentionGains, AttentionInputs, KvCache, MultiheadAttention,
};
use torchscale_core::dropout::{drop_path, dropout};
use torchscale_core::ffn::{FeedForward, FfnConfig};
use torchscale_core::{
    Branch, Ctx, Multiway, NormSpec, ParamRole, Residual, Result, Site, Stabilizer,
};

use torchscale_moe::MoeLayer;

use crate::spec::StackSpec;

/// The FFN position of a layer: dense (multiway in the encoder) or MoE.
#[derive(Debug)]
pub enum FfnBlock {
    /// `ffn.*`.
    Dense(Multiway<FeedForward>),
    /// `moe_layer.*`.
    Moe(Box<MoeLayer>),
}

/// Per-call inputs of a layer.
#[derive(Debug, Default)]
pub struct LayerInputs<'a> {
    /// Self-attention key padding mask `[B, T]`.
    pub self_padding_mask: Option<&'a Tensor>,
    /// Additive self-attention mask `[T, S]`.
    pub self_attn_mask: Option<&'a Tensor>,
    /// Self-attention relative bias.
    pub self_rel_pos: Option<&'a Tensor>,
    /// Encoder output for cross-attention.
    pub memory: Option<&'a Tensor>,
    /// Encoder padding mask.
    pub memory_padding_mask: Option<&'a Tensor>,
    /// Cross-attention relative bias.
    pub cross_rel_pos: Option<&'a Tensor>,
    /// Incremental: processing a whole prompt.
    pub is_first_step: bool,
    /// Multiway branch.
    pub branch: Branch,
    /// Training mode.
    pub train: bool,
    /// MoE uniforms for this layer.
    pub moe_uniform: Option<&'a Tensor>,
    /// The MoE sees tokens time-major (torchscale's encoder).
    pub time_major: bool,
}

/// One layer with torchscale's key layout.
#[derive(Debug)]
pub struct Layer {
    self_attn: MultiheadAttention,
    self_res: Box<dyn Residual>,
    cross: Option<(MultiheadAttention, Box<dyn Residual>)>,
    ffn: FfnBlock,
    ffn_res: Box<dyn Residual>,
    dropout: f64,
    drop_path: f64,
}

fn gains(st: &dyn Stabilizer, site: Site) -> AttentionGains {
    AttentionGains {
        v: st.init_gain(site, ParamRole::Value),
        out: st.init_gain(site, ParamRole::Out),
    }
}

impl Layer {
    /// Builds layer `index` under `vb` (= `layers.{index}`).
    pub fn new(
        spec: &StackSpec,
        st: &dyn Stabilizer,
        index: usize,
        cross: bool,
        causal_stack: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let norm = NormSpec {
            dim: spec.embed_dim,
            eps: spec.layernorm_eps,
            multiway: spec.multiway && !causal_stack,
        };
        let attn_cfg = |self_attention: bool, site: Site| AttentionConfig {
            embed_dim: spec.embed_dim,
            num_heads: spec.heads,
            self_attention,
            inner_norm: st.inner_norm(site),
            xpos_scale_base: if self_attention {
                spec.xpos_scale_base
            } else {
                None
            },
            multiway: spec.multiway,
            attention_dropout: spec.attention_dropout,
            layernorm_eps: spec.layernorm_eps,
        };
        let self_attn = MultiheadAttention::new(
            attn_cfg(true, Site::SelfAttention),
            gains(st, Site::SelfAttention),
            vb.pp("self_attn"),
        )?;
        let self_res = st.residual(Site::SelfAttention, norm, vb.clone())?;
        let cross = if cross {
            let a = MultiheadAttention::new(
                attn_cfg(false, Site::CrossAttention),
                gains(st, Site::CrossAttention),
                vb.pp("encoder_attn"),
            )?;
            let norm = NormSpec {
                multiway: false,
                ..norm
            };
            Some((a, st.residual(Site::CrossAttention, norm, vb.clone())?))
        } else {
            None
        };
        let ffn = if let (true, Some(moe)) = (spec.is_moe_layer(index), &spec.moe) {
            let mut cfg = moe.layer.clone();
            cfg.inner_norm = st.inner_norm(Site::FeedForward);
            let gain = st.init_gain(Site::FeedForward, ParamRole::Fc1);
            let layer = match &moe.expert_comm {
                Some(c) => MoeLayer::new_expert_parallel(cfg, gain, vb.pp("moe_layer"), c.clone())?,
                None => MoeLayer::new(cfg, gain, vb.pp("moe_layer"))?,
            };
            FfnBlock::Moe(Box::new(layer.with_layer_index(index)))
        } else {
            let cfg = FfnConfig {
                embed_dim: spec.embed_dim,
                ffn_dim: spec.ffn_dim,
                activation: spec.activation,
                activation_dropout: spec.activation_dropout,
                dropout: spec.dropout,
                inner_norm: st.inner_norm(Site::FeedForward),
                layernorm_eps: spec.layernorm_eps,
            };
            // torchscale's decoder never wraps its FFN in multiway; the encoder does.
            let mw = spec.multiway && !causal_stack;
            let gain = st.init_gain(Site::FeedForward, ParamRole::Fc1);
            FfnBlock::Dense(Multiway::new(mw, vb.pp("ffn"), |vb| {
                FeedForward::new(cfg, gain, vb)
            })?)
        };
        let ffn_res = st.residual(Site::FeedForward, norm, vb.clone())?;
        Ok(Self {
            self_attn,
            self_res,
            cross,
            ffn,
            ffn_res,
            dropout: spec.dropout,
            drop_path: spec.drop_path(index),
        })
    }

    /// The self-attention module.
    pub fn self_attn(&self) -> &MultiheadAttention {
        &self.self_attn
    }

    /// The FFN block.
    pub fn ffn(&self) -> &FfnBlock {
        &self.ffn
    }

    /// `[B, T, C] -> [B, T, C]`; MoE outputs are pushed to `aux`.
    pub fn forward(
        &self,
        x: &Tensor,
        inp: &LayerInputs,
        cache: Option<&mut KvCache>,
        aux: &mut Vec<torchscale_core::AuxOutput>,
    ) -> Result<Tensor> {
        let (train, br) = (inp.train, inp.branch);
        let post = |y: Tensor| -> Result<Tensor> {
            drop_path(&dropout(&y, self.dropout, train)?, self.drop_path, train)
        };
        let mut cache = cache;
        let x = self.self_res.forward_branch(x, br, &mut |h| {
            let a = AttentionInputs {
                key_padding_mask: inp.self_padding_mask,
                attn_mask: inp.self_attn_mask,
                rel_pos: inp.self_rel_pos,
                is_first_step: inp.is_first_step,
                branch: br,
                train,
            };
            post(self.self_attn.forward(h, h, &a, cache.as_deref_mut())?)
        })?;
        let x = match (&self.cross, inp.memory) {
            (Some((attn, res)), Some(memory)) => res.forward_branch(&x, br, &mut |h| {
                let a = AttentionInputs {
                    key_padding_mask: inp.memory_padding_mask,
                    rel_pos: inp.cross_rel_pos,
                    branch: br,
                    train,
                    ..Default::default()
                };
                post(attn.forward(h, memory, &a, None)?)
            })?,
            _ => x,
        };
        self.ffn_res
            .forward_branch(&x, br, &mut |h| match &self.ffn {
                FfnBlock::Dense(ffn) => drop_path(
                    &ffn.apply(h, br, |f, h| f.forward(h, train))?,
                    self.drop_path,
                    train,
                ),
                FfnBlock::Moe(moe) => {
                    let mut ctx = Ctx {
                        train,
                        moe_uniform: inp.moe_uniform,
                        time_major: inp.time_major,
                        ..Default::default()
                    };
                    let y = moe.forward_ctx(h, &mut ctx, moe.layer_index())?;
                    aux.append(&mut ctx.aux);
                    drop_path(&y, self.drop_path, train)
                }
            })
    }
}
