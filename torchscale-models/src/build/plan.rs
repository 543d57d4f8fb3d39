//! A stack's layers before they are built: the stabiliser of each layer and the user's hooks.

use std::sync::Arc;

use candle_nn::VarBuilder;
use torchscale_core::{Error, Result, Stabilizer};

use super::hooks::StackHooks;
use crate::config::{LayerTechnique, Technique};
use crate::layer::{torchscale_layout, Layer, LayerBuildCx};
use crate::spec::StackSpec;

/// How a stack's layers are built: one stabiliser per layer (mixed stacks such as Mix-LN:
/// Post-LN at the bottom, Pre-LN on top) and the [`StackHooks`].
#[derive(Debug, Clone)]
pub struct StackPlan {
    /// The stack's own technique (the config's), which `stabilizer()` of a stack reports.
    pub stabilizer: Arc<dyn Stabilizer>,
    /// One stabiliser per layer, bottom first.
    pub layers: Vec<Arc<dyn Stabilizer>>,
    /// The user's hooks.
    pub hooks: StackHooks,
}

impl StackPlan {
    /// Every one of `layers` layers wired by `st`, no hooks.
    pub fn uniform(st: Arc<dyn Stabilizer>, layers: usize) -> Self {
        Self {
            layers: vec![st.clone(); layers],
            stabilizer: st,
            hooks: StackHooks::default(),
        }
    }

    /// Whether the stack ends with a LayerNorm: when its top layer's stabiliser wants one (so a
    /// Mix-LN stack, Post-LN below and Pre-LN on top, gets one; the reverse does not).
    pub fn final_norm(&self) -> bool {
        self.layers.last().unwrap_or(&self.stabilizer).final_norm()
    }

    /// Builds the layers under `vb.pp("layers")`: torchscale's layout wired by each layer's
    /// stabiliser, then the site hook.
    pub(crate) fn build_layers(
        &self,
        spec: &StackSpec,
        cross_attention: bool,
        causal: bool,
        vb: &VarBuilder,
    ) -> Result<Vec<Layer>> {
        if self.layers.len() != spec.layers {
            return Err(Error::invalid(
                "stabilizers",
                format!(
                    "{} per-layer stabilisers for a stack of {} layers",
                    self.layers.len(),
                    spec.layers
                ),
            ));
        }
        let vb = vb.pp("layers");
        self.layers
            .iter()
            .enumerate()
            .map(|(index, st)| {
                let cx = LayerBuildCx {
                    index,
                    spec,
                    stabilizer: st.as_ref(),
                    vb: vb.pp(index),
                    cross_attention,
                    causal,
                };
                let mut sites = torchscale_layout(&cx, &self.hooks)?;
                if let Some(hook) = &self.hooks.sites {
                    sites = hook(&cx, sites)?;
                }
                Layer::from_sites(index, sites)
            })
            .collect()
    }
}

/// The plan of a stack whose config selects `technique`, with `layer_techniques` overrides and
/// the stabiliser hook of `hooks` on top. Every stabiliser is built for the whole stack
/// (`spec.kind`): a DeepNorm or Admin range inside a mixed stack uses the constants of the full
/// depth, not of the range.
pub fn stack_plan(
    technique: Technique,
    layer_techniques: &[LayerTechnique],
    spec: &StackSpec,
    admin_scale: &str,
    admin_param: bool,
    hooks: &StackHooks,
) -> Result<StackPlan> {
    let build = |t: Technique| -> Result<Arc<dyn Stabilizer>> {
        Ok(Arc::from(super::stabilizer(
            t,
            spec.kind,
            admin_scale,
            admin_param,
        )?))
    };
    let default = build(technique)?;
    // One object per technique in use, shared by its layers.
    let mut built: Vec<(Technique, Arc<dyn Stabilizer>)> = vec![(technique, default.clone())];
    let mut layers = Vec::with_capacity(spec.layers);
    for i in 0..spec.layers {
        let from_hook = match &hooks.stabilizer {
            Some(h) => h(spec, i)?,
            None => None,
        };
        let st = match from_hook {
            Some(st) => st,
            None => {
                let t = LayerTechnique::technique_of(layer_techniques, i).unwrap_or(technique);
                match built.iter().find(|(b, _)| *b == t) {
                    Some((_, st)) => st.clone(),
                    None => {
                        let st = build(t)?;
                        built.push((t, st.clone()));
                        st
                    }
                }
            }
        };
        layers.push(st);
    }
    Ok(StackPlan {
        stabilizer: default,
        layers,
        hooks: hooks.clone(),
    })
}
