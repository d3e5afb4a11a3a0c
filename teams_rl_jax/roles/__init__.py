"""The LLM roles on text: one instructor and one reviewer, used by every stage that calls them.

* :mod:`.instructor`: prompt assembly (the operation templates of ``env.prompts``), one batched
  ``complete`` per step, :func:`~.instructor.clean_rewrite` and the truncation flag
  (``finish_reason == "length"``). The policy stage's host env loop and the generate stage call it.
* :mod:`.reviewer`: the comparison prompt, the reply parsers (``exact``, ``lenient``) and the
  unparseable-reply count. The jitted logit judge (``env.judge``) reads the same template.
* :mod:`.host`: the two as the env's operator / reward term on instruction buffers
  (``io_callback`` inside the jitted step; text in, text out).

Each role's reply length is ``roles.<role>.max_new_tokens`` (``backends.config.max_new_tokens``).
"""
