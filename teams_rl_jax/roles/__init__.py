"""The LLM roles on text: one instructor and one reviewer, used by every stage that calls them.

* :mod:`.prompts`: the instructor's operation templates and the expert's question (text).
* :mod:`.instructor`: prompt assembly (the operation templates of :mod:`.prompts`), one batched
  ``complete`` per step, :func:`~.instructor.clean_rewrite` and the truncation flag
  (``finish_reason == "length"``). The policy stage's host env loop and the generate stage call it.
* :mod:`.reviewer`: the comparison prompt, the reply parsers (``exact``, ``lenient``) and the
  unparseable-reply count. The jitted logit judge (``env.judge``) reads the same template.
The env adapts them to its buffers in ``env.host_roles`` (``io_callback`` inside the jitted step)
and builds them from config in ``env.factory``. This package imports nothing of ``env``: the env
(and the jitted operator and judge, which read the same templates) sits above it.

Each role's reply length is ``roles.<role>.max_new_tokens`` (``backends.config.max_new_tokens``).
"""
