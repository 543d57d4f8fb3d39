//! A model's size before it is built, and the memory budget it must fit in.
//!
//! Every constructor counts the parameters its config asks for with overflow-safe arithmetic
//! before allocating anything, and refuses with [`Error::MemoryBudget`] (naming the fields and
//! the bytes) when they exceed the budget ([`Budget`]): [`BuildOptions::memory_budget`], else
//! the memory the system says is available ([`available_memory`]). The count is exact for the
//! config's layout: token and position tables (`max_positions + 2` rows, as torchscale), every
//! layer's attention, feed-forward or experts and gate, residual norms, Sub-LN inner norms,
//! Admin's learnable ω, multiway copies, relative-position tables and an untied output
//! projection; bytes are the count times the dtype's size. Parameters that a
//! [site or router hook](super::StackHooks) adds in code are not foreseen.
//!
//! The check runs twice: a lower bound from the stack description alone (so a stack of 10^9
//! layers is refused before its plan, one entry per layer, is made), then the exact count once
//! the plan says which stabiliser each layer has. The low-level constructors that take a built
//! plan (`Decoder::from_plan`, ...) do not check: call [`check_stack`] first.

use candle_core::{DType, Device};
use torchscale_core::{Error, NormSpec, Result, Site, Stabilizer};

use super::available_memory::available_memory;
use super::{BuildOptions, StackPlan};
use crate::config::{DecoderConfig, EncoderConfig, EncoderDecoderConfig};
use crate::spec::StackSpec;

/// Host bytes each layer takes besides its parameters (its structs, parameter names and tensor
/// headers: 8 to 10 KiB measured for a Pre-LN or Sub-LN decoder layer of width 2, rounded up),
/// so that a deep stack of tiny layers is sized too.
pub const LAYER_OVERHEAD_BYTES: u64 = 12 << 10;

/// Where a stack sits, which decides the parts it builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackRole {
    /// An encoder alone (with an output projection when the spec asks for one).
    Encoder,
    /// A decoder alone.
    Decoder,
    /// The encoder of an encoder-decoder (never an output projection).
    EncoderOfEncDec,
    /// The decoder of an encoder-decoder (cross-attention in every layer).
    DecoderOfEncDec {
        /// Its token table is the encoder's (`share_all_embeddings`).
        shared_tokens: bool,
    },
}

impl StackRole {
    fn is_decoder(self) -> bool {
        matches!(self, StackRole::Decoder | StackRole::DecoderOfEncDec { .. })
    }

    /// The config fields of this stack: (`encoder`/`decoder` prefix, positions field).
    fn fields(self) -> (&'static str, &'static str) {
        if self.is_decoder() {
            ("decoder", "max_target_positions")
        } else {
            ("encoder", "max_source_positions")
        }
    }
}

/// What a model takes: its trainable scalars and its layers (each with
/// [`LAYER_OVERHEAD_BYTES`] of host objects). Counts saturate at `u128::MAX`, which no budget
/// admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModelSize {
    /// Trainable scalars: what the model's `ParamStore` holds once built.
    pub params: u128,
    /// Layers of all stacks.
    pub layers: u128,
    /// Elements of the largest parameter, which the host draws (in f32) before it goes to the
    /// model's device.
    pub largest: u128,
}

impl ModelSize {
    /// Bytes of the parameters in `dtype`: `params × dtype size`.
    pub fn param_bytes(&self, dtype: DType) -> u128 {
        self.params.saturating_mul(dtype.size_in_bytes() as u128)
    }

    /// Bytes in all: the parameters plus the layers' host objects.
    pub fn bytes(&self, dtype: DType) -> u128 {
        self.param_bytes(dtype)
            .saturating_add(self.layers.saturating_mul(LAYER_OVERHEAD_BYTES as u128))
    }

    /// Host bytes a build on an accelerator takes: the layers' objects and the f32 draw of the
    /// largest parameter.
    pub fn host_bytes(&self) -> u128 {
        self.layers
            .saturating_mul(LAYER_OVERHEAD_BYTES as u128)
            .saturating_add(self.largest.saturating_mul(4))
    }

    /// The size of two parts together.
    pub fn plus(self, other: ModelSize) -> ModelSize {
        ModelSize {
            params: self.params.saturating_add(other.params),
            layers: self.layers.saturating_add(other.layers),
            largest: self.largest.max(other.largest),
        }
    }
}

/// The memory a build must fit in.
///
/// On the CPU the model and its objects share one pool: [`BuildOptions::memory_budget`], else
/// [`available_memory`]. On an accelerator the parameters live in the device's memory, which
/// the system figures do not describe: they are checked against `memory_budget` when it is set
/// (say, the device's size), not otherwise; the host still holds the layers' objects and draws
/// each parameter before copying it, and that is checked against [`available_memory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The parameters live in host memory (a CPU model): one pool, `device == Some(host)`.
    pub cpu: bool,
    /// Bytes the parameters may take where they live; None: unknown, not checked.
    pub device: Option<u64>,
    /// Bytes the host may still give.
    pub host: u64,
}

impl Budget {
    /// The budget of a build with `opts` on `device` (reads the system's figure once).
    pub fn resolve(opts: &BuildOptions, device: &Device) -> Self {
        if device.is_cpu() {
            let b = opts.memory_budget.unwrap_or_else(available_memory);
            Self {
                cpu: true,
                device: Some(b),
                host: b,
            }
        } else {
            Self {
                cpu: false,
                device: opts.memory_budget,
                host: available_memory(),
            }
        }
    }
}

/// The size of the decoder `cfg` (finalised here) builds with `opts`, as [`Decoder::new`]
/// counts it. It makes the layer plan, one entry per layer: for a config of unknown depth, weigh
/// [`stack_floor`] first.
///
/// [`Decoder::new`]: crate::Decoder::new
pub fn decoder_size(cfg: &DecoderConfig, opts: &BuildOptions) -> Result<ModelSize> {
    let cfg = cfg.clone().finalize()?;
    let spec = super::decoder_spec(&cfg, opts);
    let plan = super::decoder_plan(&cfg, &spec, opts)?;
    Ok(stack_size(&spec, &plan, StackRole::Decoder))
}

/// The size of the encoder `cfg` (finalised here) builds with `opts`; see [`decoder_size`].
pub fn encoder_size(cfg: &EncoderConfig, opts: &BuildOptions) -> Result<ModelSize> {
    let cfg = cfg.clone().finalize()?;
    let spec = super::encoder_spec(&cfg, opts);
    let plan = super::encoder_plan(&cfg, &spec, opts)?;
    Ok(stack_size(&spec, &plan, StackRole::Encoder))
}

/// The size of the encoder-decoder `cfg` (finalised here) builds with `opts`; see
/// [`decoder_size`].
pub fn encoder_decoder_size(cfg: &EncoderDecoderConfig, opts: &BuildOptions) -> Result<ModelSize> {
    let cfg = cfg.clone().finalize()?;
    let (enc, dec) = super::encoder_decoder_specs(&cfg, opts);
    let (enc_role, dec_role) = super::encoder_decoder_roles(&cfg);
    let (enc_plan, dec_plan) = super::encoder_decoder_plans(&cfg, &enc, &dec, opts)?;
    Ok(stack_size(&enc, &enc_plan, enc_role).plus(stack_size(&dec, &dec_plan, dec_role)))
}

/// The exact size of the stack `spec` built with `plan` in `role`.
pub fn stack_size(spec: &StackSpec, plan: &StackPlan, role: StackRole) -> ModelSize {
    let moe = MoeLayers::of(spec);
    let mut params = fixed_params(spec, role);
    if plan.final_norm() && (role.is_decoder() || spec.normalize_output) {
        let copies = if role.is_decoder() {
            1
        } else {
            mw(spec.multiway)
        };
        params = params.saturating_add(ln(spec.embed_dim).saturating_mul(copies));
    }
    for (i, st) in plan.layers.iter().enumerate() {
        params = params.saturating_add(layer_params(spec, st.as_ref(), role, moe.contains(i)));
    }
    ModelSize {
        params,
        layers: plan.layers.len() as u128,
        largest: largest_tensor(spec),
    }
}

/// A lower bound of the size of the stack `spec` in `role`, whatever stabilisers its layers
/// get: no inner norms, no residual parameters, no final norm, every layer dense. Cheap for any
/// depth.
pub fn stack_floor(spec: &StackSpec, role: StackRole) -> ModelSize {
    let causal = role.is_decoder();
    let c = spec.embed_dim as u128;
    let attention = attention_params(c, spec.multiway);
    let cross = if matches!(role, StackRole::DecoderOfEncDec { .. }) {
        attention
    } else {
        0
    };
    let ffn =
        ffn_params(c, spec.ffn_dim as u128, false).saturating_mul(mw(spec.multiway && !causal));
    let layer = attention.saturating_add(cross).saturating_add(ffn);
    let layers = spec.layers as u128;
    ModelSize {
        params: fixed_params(spec, role).saturating_add(layer.saturating_mul(layers)),
        layers,
        largest: largest_tensor(spec),
    }
}

/// Refuses `size` in `dtype` over `budget` with [`Error::MemoryBudget`]: `what` is refused,
/// `sized_by` names the fields that size it. On the CPU the parameters and the layers' objects
/// count together; on an accelerator the parameters against `budget.device` (when known) and
/// the host's share ([`ModelSize::host_bytes`]) against `budget.host`.
pub fn check(
    size: ModelSize,
    dtype: DType,
    budget: Budget,
    what: &str,
    sized_by: String,
) -> Result<()> {
    let params = format!(
        "{} parameters × {} bytes ({dtype:?})",
        size.params,
        dtype.size_in_bytes()
    );
    let layers = format!("{} layers × {LAYER_OVERHEAD_BYTES} bytes", size.layers);
    let refuse = |needed: u128, budget: u64, of: String| Error::MemoryBudget {
        what: what.to_string(),
        sized_by: format!("{sized_by}: {of}"),
        needed,
        budget,
    };
    if budget.cpu {
        let needed = size.bytes(dtype);
        let allowed = budget.device.unwrap_or(budget.host);
        if needed > allowed as u128 {
            return Err(refuse(needed, allowed, format!("{params} + {layers}")));
        }
        return Ok(());
    }
    if let Some(allowed) = budget.device {
        let needed = size.param_bytes(dtype);
        if needed > allowed as u128 {
            return Err(refuse(needed, allowed, format!("{params} on the device")));
        }
    }
    let needed = size.host_bytes();
    if needed > budget.host as u128 {
        let of = format!(
            "{layers} + the largest parameter, {} f32 values, on the host",
            size.largest
        );
        return Err(refuse(needed, budget.host, of));
    }
    Ok(())
}

/// [`check`] of one stack's exact size, the fields named from `spec` and `role`.
pub fn check_stack(
    spec: &StackSpec,
    plan: &StackPlan,
    role: StackRole,
    dtype: DType,
    budget: Budget,
    what: &str,
) -> Result<()> {
    check(
        stack_size(spec, plan, role),
        dtype,
        budget,
        what,
        sized_by(spec, role),
    )
}

/// The fields that size the stack `spec`, with their values, under the config's names.
pub fn sized_by(spec: &StackSpec, role: StackRole) -> String {
    let (side, positions) = role.fields();
    let mut s = format!(
        "vocab_size {}, {side}_embed_dim {}, {side}_ffn_embed_dim {}, {side}_layers {}",
        spec.vocab_size, spec.embed_dim, spec.ffn_dim, spec.layers
    );
    if spec.learned_positions {
        s.push_str(&format!(", {positions} {}", spec.max_positions));
    }
    if let Some(m) = &spec.moe {
        s.push_str(&format!(", moe_expert_count {}", m.layer.num_experts));
    }
    if spec.multiway {
        s.push_str(", multiway");
    }
    s
}

/// Multiway copies: 2 when on.
fn mw(on: bool) -> u128 {
    if on {
        2
    } else {
        1
    }
}

/// A LayerNorm of width `d`: weight and bias.
fn ln(d: usize) -> u128 {
    (d as u128).saturating_mul(2)
}

/// `q_proj`, `k_proj`, `v_proj`, `out_proj`, each `[C, C]` plus a bias, per multiway copy.
fn attention_params(c: u128, multiway: bool) -> u128 {
    c.saturating_mul(c)
        .saturating_add(c)
        .saturating_mul(4)
        .saturating_mul(mw(multiway))
}

/// `fc1` `[F, C]` + bias, `fc2` `[C, F]` + bias, and Sub-LN's `ffn_layernorm` of width F.
fn ffn_params(c: u128, f: u128, inner_norm: bool) -> u128 {
    let inner = if inner_norm { f.saturating_mul(2) } else { 0 };
    c.saturating_mul(f)
        .saturating_mul(2)
        .saturating_add(f)
        .saturating_add(c)
        .saturating_add(inner)
}

/// The parts that do not depend on the layers' stabilisers: token and position tables, the
/// embedding LayerNorm, relative-position tables and the output projection.
fn fixed_params(spec: &StackSpec, role: StackRole) -> u128 {
    let c = spec.embed_dim as u128;
    let vocab = spec.vocab_size.max(0) as u128;
    let mut p: u128 = 0;
    if !matches!(
        role,
        StackRole::DecoderOfEncDec {
            shared_tokens: true
        }
    ) {
        p = p.saturating_add(vocab.saturating_mul(c));
    }
    if spec.learned_positions {
        let rows = (spec.max_positions as u128).saturating_add(2);
        p = p.saturating_add(rows.saturating_mul(c));
    }
    if spec.layernorm_embedding {
        // Only the encoder's is multiway.
        let copies = mw(spec.multiway && !role.is_decoder());
        p = p.saturating_add(ln(spec.embed_dim).saturating_mul(copies));
    }
    if spec.rel_pos() {
        let tables = match role {
            StackRole::DecoderOfEncDec { .. } => 2,
            _ => 1,
        };
        let table = (spec.rel_pos_buckets as u128).saturating_mul(spec.heads as u128);
        p = p.saturating_add(table.saturating_mul(tables));
    }
    let projection = match role {
        StackRole::EncoderOfEncDec => false,
        _ => spec.vocab_size > 0 && !spec.no_output_layer && !spec.share_input_output_embed,
    };
    if projection {
        p = p.saturating_add(vocab.saturating_mul(c));
    }
    p
}

/// One layer of torchscale's layout wired by `st`.
fn layer_params(spec: &StackSpec, st: &dyn Stabilizer, role: StackRole, moe: bool) -> u128 {
    let causal = role.is_decoder();
    let cross = matches!(role, StackRole::DecoderOfEncDec { .. });
    let c = spec.embed_dim as u128;
    let mut p = attention_params(c, spec.multiway);
    if st.inner_norm(Site::SelfAttention) {
        p = p.saturating_add(ln(spec.embed_dim).saturating_mul(mw(spec.multiway)));
    }
    if cross {
        // Cross-attention never has an inner norm.
        p = p.saturating_add(attention_params(c, spec.multiway));
    }
    let sites = [
        Some(Site::SelfAttention),
        cross.then_some(Site::CrossAttention),
        Some(Site::FeedForward),
    ];
    for site in sites.into_iter().flatten() {
        let norm = NormSpec {
            dim: spec.embed_dim,
            eps: spec.layernorm_eps,
            multiway: spec.multiway && !causal && site != Site::CrossAttention,
        };
        p = p.saturating_add(st.residual_param_count(site, norm) as u128);
    }
    let inner = st.inner_norm(Site::FeedForward);
    let ffn = match (&spec.moe, moe) {
        (Some(m), true) => {
            let l = &m.layer;
            let (e, c, r) = (
                l.num_experts as u128,
                l.embed_dim as u128,
                l.xmoe_routing_dim as u128,
            );
            let gate = if l.use_xmoe {
                let t = if l.paper_routing { 1 } else { 0 };
                r.saturating_mul(c)
                    .saturating_add(e.saturating_mul(r))
                    .saturating_add(t)
            } else {
                e.saturating_mul(c)
            };
            // An expert-parallel rank holds its share of the experts.
            let local = match &m.expert_comm {
                Some(comm) if comm.world_size() > 0 => e / comm.world_size() as u128,
                _ => e,
            };
            let expert = ffn_params(c, l.ffn_dim as u128, inner);
            gate.saturating_add(local.saturating_mul(expert))
        }
        _ => {
            ffn_params(c, spec.ffn_dim as u128, inner).saturating_mul(mw(spec.multiway && !causal))
        }
    };
    p.saturating_add(ffn)
}

/// Elements of the largest parameter of the stack `spec`.
fn largest_tensor(spec: &StackSpec) -> u128 {
    let c = spec.embed_dim as u128;
    let rows = |r: usize| (r as u128).saturating_mul(c);
    let mut largest = rows(spec.embed_dim)
        .max(rows(spec.ffn_dim))
        .max(rows(spec.vocab_size.max(0) as usize));
    if spec.learned_positions {
        largest = largest.max(rows(spec.max_positions).saturating_add(2 * c));
    }
    if let Some(m) = &spec.moe {
        let l = &m.layer;
        let (e, r) = (l.num_experts as u128, l.xmoe_routing_dim as u128);
        largest = largest
            .max(e.saturating_mul(c.max(r)))
            .max(r.saturating_mul(c))
            .max((l.ffn_dim as u128).saturating_mul(l.embed_dim as u128));
    }
    largest.max((spec.rel_pos_buckets as u128).saturating_mul(spec.heads as u128))
}

/// Which layers are MoE layers, answered without scanning a `moe_layers` list per layer.
struct MoeLayers {
    freq: usize,
    list: Option<Vec<usize>>,
}

impl MoeLayers {
    fn of(spec: &StackSpec) -> Self {
        match &spec.moe {
            None => Self {
                freq: 0,
                list: Some(Vec::new()),
            },
            Some(m) => Self {
                freq: m.freq,
                list: m.layers.as_ref().map(|l| {
                    let mut l = l.clone();
                    l.sort_unstable();
                    l
                }),
            },
        }
    }

    fn contains(&self, i: usize) -> bool {
        match &self.list {
            Some(list) => list.binary_search(&i).is_ok(),
            None => self.freq != 0 && (i + 1).is_multiple_of(self.freq),
        }
    }
}
