"""The siamese model and its parts, one job per module.

- ``siamese``: ``IMSMModel``, the two streams over one backbone, the mix, the loss; save / load methods.
- ``decoding``: KV-cached greedy generation (``IMSMModel.generate`` delegates to it); ``fusion``: both streams as
  one doubled batch while decoding.
- ``gate``: the gate variants and their builders (``conf/gate/*.yaml`` name them by ``_target_``).
- ``adapters``: what the model needs from an adapter-carrying backbone (peft's ``PeftModel``, ``loramoe``) and how
  each kind is attached and loaded; ``adalora``: AdaLoRA's training-time extras.
- ``families``: where each backbone family keeps its last hidden state and head (``chatglm``: ChatGLM2/3).
- ``build``: the model from a run config; ``checkpoint``: the run directory format.
"""
