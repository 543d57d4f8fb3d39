//! torchscale's layer layout as sites: `self_attn`, `encoder_attn` in the decoder of an
//! encoder-decoder, then `ffn` or `moe_layer`, under torchscale's keys and with the init gains
//! and inner norms of the layer's stabiliser.

use torchscale_core::attention::{AttentionConfig, AttentionGains, MultiheadAttention};
use torchscale_core::ffn::{FeedForward, FfnConfig};
use torchscale_core::{Multiway, ParamRole, Result, Site, Stabilizer};
use torchscale_moe::MoeLayer;

use super::{LayerBuildCx, SiteBlock};
use crate::build::StackHooks;

/// The sites torchscale builds for layer `cx.index`, in its parameter order (which a seeded
/// init follows). MoE layers take their router from `hooks.router` when it gives one.
pub fn torchscale_layout(cx: &LayerBuildCx, hooks: &StackHooks) -> Result<Vec<SiteBlock>> {
    let spec = cx.spec;
    let mut sites = Vec::with_capacity(3);
    let self_attn = attention(cx, true)?;
    sites.push(
        SiteBlock::new(
            "self_attn",
            cx.residual(Site::SelfAttention)?,
            Box::new(self_attn),
        )
        .with_dropout(spec.dropout)
        .with_drop_path(cx.drop_path()),
    );
    if cx.cross_attention {
        let cross = attention(cx, false)?;
        sites.push(
            SiteBlock::new(
                "encoder_attn",
                cx.residual(Site::CrossAttention)?,
                Box::new(cross),
            )
            .with_dropout(spec.dropout)
            .with_drop_path(cx.drop_path()),
        );
    }
    // The feed-forward and the experts apply the stack's dropout themselves.
    let ffn = if spec.is_moe_layer(cx.index) {
        moe_site(cx, hooks)?
    } else {
        dense_site(cx)?
    };
    sites.push(ffn.with_drop_path(cx.drop_path()));
    Ok(sites)
}

fn gains(st: &dyn Stabilizer, site: Site) -> AttentionGains {
    AttentionGains {
        v: st.init_gain(site, ParamRole::Value),
        out: st.init_gain(site, ParamRole::Out),
    }
}

/// `self_attn` or `encoder_attn`.
fn attention(cx: &LayerBuildCx, self_attention: bool) -> Result<MultiheadAttention> {
    let (spec, st) = (cx.spec, cx.stabilizer);
    let (site, name) = if self_attention {
        (Site::SelfAttention, "self_attn")
    } else {
        (Site::CrossAttention, "encoder_attn")
    };
    let cfg = AttentionConfig {
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
    MultiheadAttention::new(cfg, gains(st, site), cx.vb.pp(name))
}

/// `ffn`: multiway in a multiway encoder (torchscale's decoder never wraps its FFN).
fn dense_site(cx: &LayerBuildCx) -> Result<SiteBlock> {
    let (spec, st) = (cx.spec, cx.stabilizer);
    let cfg = FfnConfig {
        embed_dim: spec.embed_dim,
        ffn_dim: spec.ffn_dim,
        activation: spec.activation,
        activation_dropout: spec.activation_dropout,
        dropout: spec.dropout,
        inner_norm: st.inner_norm(Site::FeedForward),
        layernorm_eps: spec.layernorm_eps,
    };
    let gain = st.init_gain(Site::FeedForward, ParamRole::Fc1);
    let ffn = Multiway::new(spec.multiway && !cx.causal, cx.vb.pp("ffn"), |vb| {
        FeedForward::new(cfg, gain, vb)
    })?;
    Ok(SiteBlock::new(
        "ffn",
        cx.residual(Site::FeedForward)?,
        Box::new(ffn),
    ))
}

/// `moe_layer`, expert-parallel when the spec says so, routed by the hook's router or else the
/// one the layer's settings name.
fn moe_site(cx: &LayerBuildCx, hooks: &StackHooks) -> Result<SiteBlock> {
    let st = cx.stabilizer;
    let moe = cx.spec.moe.as_ref().ok_or_else(|| {
        torchscale_core::Error::invalid("moe", "an MoE layer in a stack without MoE settings")
    })?;
    let mut cfg = moe.layer_config(cx.index);
    cfg.inner_norm = st.inner_norm(Site::FeedForward);
    let gain = st.init_gain(Site::FeedForward, ParamRole::Fc1);
    let vb = cx.vb.pp("moe_layer");
    // The router first, as MoeLayer::new builds it: parameters are drawn in build order.
    let router = match &hooks.router {
        Some(h) => h(cx, &cfg, vb.pp("gate"))?,
        None => None,
    };
    let layer = match (&moe.expert_comm, router) {
        (Some(c), Some(r)) => MoeLayer::expert_parallel_with_router(cfg, r, gain, vb, c.clone())?,
        (Some(c), None) => MoeLayer::new_expert_parallel(cfg, gain, vb, c.clone())?,
        (None, Some(r)) => MoeLayer::with_router(cfg, r, gain, vb)?,
        (None, None) => MoeLayer::new(cfg, gain, vb)?,
    };
    Ok(SiteBlock::new(
        "moe_layer",
        cx.residual(Site::FeedForward)?,
        Box::new(layer.with_layer_index(cx.index)),
    ))
}
