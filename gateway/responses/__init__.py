"""The Responses API (`/v1/responses`), built on the chat serving machinery."""
