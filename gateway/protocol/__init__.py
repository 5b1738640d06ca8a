"""The OpenAI API's wire shapes: request and response schemas, and the error envelope."""
