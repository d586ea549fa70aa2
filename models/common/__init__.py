"""The family-independent parts of the models: the attention entry point (`attention.attend`) and its kernel
table, the attention kernels, the KV cache, the rollouts and samplers, the flow-matching scheduler, the chunk
layout, the attention window rule and the labels of every forward. Any video DiT that calls `attend` with
`AttentionCall` labels uses these unchanged; the Wan2.1 family is models/wan/."""
