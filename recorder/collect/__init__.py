"""`gymtape record` and Gym file formats: the collector over Gym agents' ``/run`` and the
built-in environments (``_collector``, ``_envs``), Gym rollout JSONL import/export (``_gym``)
and synthetic rollouts (``_synthetic``). Imports the ``tape`` wing, never ``serve``."""
