"""Token data: tokenization, Megatron .bin/.idx and OLMo memmaps, the native loader."""
