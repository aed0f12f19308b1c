"""The site's task handlers, one per task kind (``registry.HANDLERS``), each run by the site
pipeline (``site_agent.boundary.pipeline``) under the contract of ``base.TaskHandler``."""
