"""Support for the LLM stage: prompts, output validation and scoring, pricing, resilience guards."""
