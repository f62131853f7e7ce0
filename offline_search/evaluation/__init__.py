"""The evaluation harness: WikiText-2 perplexity and ShapesVQA accuracy of a LLaVA, offline
(transformers, an artifact's masks applied) or through an OpenAI-compatible server (`harness`); the
chat requests such servers take (`openai_chat`); and a `vllm serve` subprocess to evaluate through
(`vllm_server`)."""
