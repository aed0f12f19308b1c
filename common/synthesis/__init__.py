"""DP synthetic data: marginal-based (:mod:`.discretisation`, :mod:`.marginals`; the tree fit
and sampling are :mod:`orchestrator.synthesis_tree`) and generative models trained like any
dpfed model (:mod:`.autoregressive`, issue 20). Derivations: docs/synthesis.md."""
