"""corral's unit and component tests (helpers imported as `tests.<module>`)."""
