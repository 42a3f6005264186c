"""The proxy search: objectives, the search loop, and the policy it derives."""
