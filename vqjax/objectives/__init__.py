"""Token-transformer objectives, chosen by `config.model.objective.name`.

Each module registers its objective in `vqjax.registry.OBJECTIVES`; the
trainer, the sampler and the visualiser only call the `Objective` interface
(`vqjax.objectives.base`), so a new objective is a new file here.
"""
