"""Host changes the agent makes on the scheduler's behalf, through sysfs writes."""
