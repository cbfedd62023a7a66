"""Sans-IO cores: state machines that take messages and time in and return messages out."""
