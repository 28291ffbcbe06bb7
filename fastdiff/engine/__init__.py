"""The engine: schedules, coefficient tables, the step options and the one step."""
